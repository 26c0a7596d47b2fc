"""The sockets the supervisor owns and its workers inherit.

Listeners live in the supervisor, one per slot, all bound with ``SO_REUSEPORT`` on the
same address, so the kernel spreads new connections over the slots and a connection
queued on a slot survives its worker's restart (closing a reuseport listener would reset
its queue). Each slot also has a hand-off inbox: a ``SOCK_SEQPACKET`` socketpair whose
read end only the slot's worker reads and whose write end every worker may write to.
"""

from __future__ import annotations

import resource
import socket
from dataclasses import dataclass, field

LISTEN_BACKLOG = 4096


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` with SO_REUSEPORT; non-blocking."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class SlotSockets:
    """A slot's listener and hand-off inbox (read end, write end)."""

    listener: socket.socket
    inbox_read: socket.socket
    inbox_write: socket.socket

    def close(self) -> None:
        for sock in (self.listener, self.inbox_read, self.inbox_write):
            sock.close()


@dataclass
class SocketSet:
    """All inheritable sockets of a node: per-slot sockets and the admin listener."""

    host: str
    port: int
    slots: dict[int, SlotSockets] = field(default_factory=dict)
    admin: socket.socket | None = None

    def ensure_slots(self, count: int) -> None:
        """Create sockets for slots ``0..count-1`` that do not have them yet."""
        for slot_id in range(count):
            if slot_id in self.slots:
                continue
            listener = bind_listener(self.host, self.port)
            if self.port == 0:
                self.port = listener.getsockname()[1]
            read_end, write_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            read_end.setblocking(False)
            write_end.setblocking(False)
            self.slots[slot_id] = SlotSockets(listener, read_end, write_end)

    def drop_slots_from(self, count: int) -> None:
        """Close the sockets of slots ``count`` and above (after a shrink has drained)."""
        for slot_id in [s for s in self.slots if s >= count]:
            self.slots.pop(slot_id).close()

    def all(self) -> list[socket.socket]:
        """Every socket of the set (a forked worker closes those it does not need)."""
        out = [s for ss in self.slots.values()
               for s in (ss.listener, ss.inbox_read, ss.inbox_write)]
        if self.admin is not None:
            out.append(self.admin)
        return out

    def close(self) -> None:
        for ss in self.slots.values():
            ss.close()
        self.slots.clear()
        if self.admin is not None:
            self.admin.close()
            self.admin = None
