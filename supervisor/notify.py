"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET`` per message.

A no-op when ``NOTIFY_SOCKET`` is unset (not under systemd). Only the supervisor
notifies; workers never see the variable's socket.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends ``KEY=value`` lines to systemd's notification socket."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        usec = int(watchdog_usec) if watchdog_usec.isascii() and watchdog_usec.isdigit() else 0
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_s = usec / 1e6 if usec > 0 and mine else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send one message made of ``lines``; return False if it could not be sent."""
        if not self.address:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd the service is up (also ends a reload)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """Tell systemd a reload started (systemd >= 253 wants MONOTONIC_USEC with it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Update the one-line status shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Pet the watchdog (call only while every slot is healthy)."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the notification socket (e.g. in a forked child)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
