"""The shape every established peer channel has, whatever carries it.

The fallback controller hands the application one :class:`MessageChannel`: a WebRTC data
channel (direct or TURN-relayed) or the end-to-end encrypted WebSocket channel through
beach-rescue. Messages are whole byte strings, delivered reliably and in order.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable


class TransportKind(enum.Enum):
    """Which rung of the escalation ladder carries a channel."""

    WEBRTC = "webrtc"
    TURN = "turn"
    WEBSOCKET_FALLBACK = "websocket-fallback"


@runtime_checkable
class MessageChannel(Protocol):
    """A reliable, ordered, message-oriented channel to the other peer(s)."""

    @property
    def transport(self) -> TransportKind:
        """The rung of the ladder this channel runs on."""
        ...

    async def send(self, data: bytes) -> None:
        """Queue one message; waits (backpressure) while the channel's buffer is full."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Messages from the other side, in order; ends when the other side closes."""
        ...

    async def close(self) -> None:
        """End the channel in an orderly way; idempotent."""
        ...
