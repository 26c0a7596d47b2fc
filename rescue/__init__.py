"""beach-rescue: the last-resort WebSocket relay for Beach sessions."""

__version__ = "0.1.0"
