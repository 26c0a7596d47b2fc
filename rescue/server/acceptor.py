"""A worker's intake: its own accept loop, the peek that routes, and the hand-off channel.

Each worker accepts on its slot's listening socket (the supervisor owns it, so queued
connections survive a worker restart). For each new connection it peeks at the request
line without consuming it (``MSG_PEEK``), finds the ``session`` parameter and asks the
ring which slot owns it. Its own slot: the socket goes to aiohttp through
``loop.connect_accepted_socket``. Another slot: the file descriptor is passed with
``socket.send_fds`` over that slot's ``SOCK_SEQPACKET`` inbox; no byte was read, so the
owner serves the request as if it had accepted it. A hand-off waits in the inbox while
the owner restarts (and when the inbox queue is full, the sender holds the connection and
retries for up to ``hold_s``); the owner answers 503 to hand-offs older than ``hold_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from rescue.logs import log_event
from rescue.peek import MAX_REQUEST_LINE, Route, route_request
from rescue.proxy_protocol import MAX_HEADER_LENGTH, ProxyHeaderError, parse_proxy_header
from rescue.ring import Ring

log = logging.getLogger("rescue.acceptor")

ACCEPT_BATCH = 64
INBOX_BATCH = 64
_STAMP = struct.Struct("!ddI")  # CLOCK_MONOTONIC at accept and at send, sender slot
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEEK_RETRY_FIRST_S = 0.002
_HANDOFF_RETRY_FIRST_S = 0.005
_HANDOFF_RETRY_MAX_S = 0.1
MAX_HELD_HANDOFFS = 4096
"""Connections held while their owner's inbox is full; past this they are refused (503)."""
_PEEK_RETRY_MAX_S = 0.05


@dataclass(slots=True)
class IntakeStats:
    """Counters of a worker's intake."""

    accepted: int = 0
    served_local: int = 0
    handed_off: int = 0
    adopted: int = 0
    handoff_failures: int = 0
    handoff_retries: int = 0
    handoffs_expired: int = 0
    peek_timeouts: int = 0
    accept_errors: int = 0
    proxy_headers: int = 0
    proxy_refused: int = 0


def refuse_raw(conn: socket.socket, status: str, error: str, detail: str,
               retry_after_s: int) -> None:
    """Answer an unparsed connection with a JSON error, best effort, and close it.

    Bytes the client already sent are read and dropped first: closing a socket with
    unread data resets it, and the client would lose the answer.
    """
    body = msgspec.json.encode({"error": error, "detail": detail})
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Retry-After: {retry_after_s}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        for _ in range(16):  # at most 1 MiB; a flood past that is reset, as it deserves
            if not conn.recv(65536, socket.MSG_DONTWAIT):
                break
    with contextlib.suppress(OSError):
        conn.send(head + body, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        conn.shutdown(socket.SHUT_WR)
    conn.close()


class Acceptor:
    """The intake of one worker slot; start and stop it with the supervisor's orders."""

    def __init__(self, *, slot: int, ring: Ring[int], listener: socket.socket,
                 inbox: socket.socket | None, outboxes: Mapping[int, socket.socket],
                 serve: Callable[[socket.socket, float], None], peek_timeout_s: float,
                 hold_s: float, control_slot: int | None = None,
                 proxy_protocol: bool = False) -> None:
        self.slot = slot
        self.proxy_protocol = proxy_protocol
        self.peek_size = MAX_REQUEST_LINE + (MAX_HEADER_LENGTH if proxy_protocol else 0)
        self.ring = ring
        self.listener = listener
        self.inbox = inbox
        self.outboxes = outboxes
        self.serve = serve
        self.peek_timeout_s = peek_timeout_s
        self.hold_s = hold_s
        self.control_slot = control_slot
        self.stats = IntakeStats()
        self.running = False
        self._loop = asyncio.get_running_loop()
        self._pending: set[_Peek] = set()
        self._held = 0
        self._last_resource_log = 0.0
        self._resume_handle: asyncio.TimerHandle | None = None

    # --- intake on/off -----------------------------------------------------------------
    def start(self) -> None:
        """Start accepting and adopting."""
        if self.running:
            return
        self.running = True
        self._loop.add_reader(self.listener.fileno(), self._on_accept)
        if self.inbox is not None:
            self._loop.add_reader(self.inbox.fileno(), self._on_inbox)

    def stop(self) -> None:
        """Stop accepting and adopting; connections being peeked are still routed."""
        if not self.running:
            return
        self.running = False
        self._loop.remove_reader(self.listener.fileno())
        if self.inbox is not None:
            self._loop.remove_reader(self.inbox.fileno())
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None

    # --- accept --------------------------------------------------------------------------
    def _on_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.stats.accept_errors += 1
                if e.errno in _RESOURCE_ERRNOS:
                    self._pause_accepting(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            self.stats.accepted += 1
            log_event(log, "connection.accepted", level=logging.DEBUG, slot=self.slot)
            peek = _Peek(self, conn)
            self._pending.add(peek)
            peek.attempt()

    def _pause_accepting(self, error: OSError) -> None:
        """Out of file descriptors or memory: stop accepting for a moment, say so clearly."""
        now = time.monotonic()
        if now - self._last_resource_log > 5:
            self._last_resource_log = now
            log_event(log, "accept.resource_limit", level=logging.ERROR,
                      error=errno.errorcode.get(error.errno or 0, str(error.errno)),
                      detail="cannot accept more connections (file descriptor or memory "
                             "limit); raise LimitNOFILE or lower max_connections")
        self._loop.remove_reader(self.listener.fileno())

        def resume() -> None:
            self._resume_handle = None
            if self.running:
                self._loop.add_reader(self.listener.fileno(), self._on_accept)

        self._resume_handle = self._loop.call_later(0.1, resume)

    # --- routing -------------------------------------------------------------------------
    def route(self, conn: socket.socket, session: str | None, accepted_at: float,
              control: bool = False) -> None:
        """Serve ``conn`` here or hand it to the slot that owns ``session``.

        Control-plane requests go to ``control_slot`` when one is set. ``accepted_at``
        (``time.monotonic()`` at accept) travels along: the request's deadline counts
        from it, on whichever worker serves it.
        """
        if control:
            owner = self.slot if self.control_slot is None else self.control_slot
        else:
            owner = self.slot if session is None else self.ring.owner(session)
        if owner == self.slot:
            self.stats.served_local += 1
            self.serve(conn, accepted_at)
            return
        self._hand_off(conn, owner, accepted_at, None, _HANDOFF_RETRY_FIRST_S)

    def _hand_off(self, conn: socket.socket, owner: int, accepted_at: float,
                  first_try: float | None, delay: float) -> None:
        """Pass ``conn`` to ``owner``'s inbox; while the inbox is full, retry for ``hold_s``.

        A full inbox means the owner is restarting (its successor will drain the queue)
        or briefly overwhelmed, so the connection is held rather than refused at once.
        """
        outbox = self.outboxes.get(owner)
        now = time.monotonic()
        try:
            if outbox is None:
                raise OSError(errno.ENOENT, f"no inbox for slot {owner}")
            socket.send_fds(outbox, [_STAMP.pack(accepted_at, now, self.slot)],
                            [conn.fileno()], socket.MSG_DONTWAIT)
        except OSError as e:
            first_try = now if first_try is None else first_try
            if (e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)
                    and now - first_try < self.hold_s and self._held < MAX_HELD_HANDOFFS):
                self._held += 1
                self.stats.handoff_retries += 1
                self._loop.call_later(delay, self._retry_hand_off, conn, owner, accepted_at,
                                      first_try, min(delay * 2, _HANDOFF_RETRY_MAX_S))
                return
            self.stats.handoff_failures += 1
            log_event(log, "handoff.failed", level=logging.WARNING, owner=owner,
                      error=errno.errorcode.get(e.errno or 0, str(e)),
                      held_s=round(now - first_try, 3))
            refuse_raw(conn, "503 Service Unavailable", "overloaded",
                       "the worker owning this session is unavailable", 1)
            return
        self.stats.handed_off += 1
        log_event(log, "handoff", level=logging.DEBUG, slot=self.slot, owner=owner)
        conn.close()

    def _retry_hand_off(self, conn: socket.socket, owner: int, accepted_at: float,
                        first_try: float, delay: float) -> None:
        self._held -= 1
        self._hand_off(conn, owner, accepted_at, first_try, delay)

    # --- adopt ---------------------------------------------------------------------------
    def _on_inbox(self) -> None:
        assert self.inbox is not None
        for _ in range(INBOX_BATCH):
            try:
                packet, fds, _flags, _addr = socket.recv_fds(self.inbox, 64, 4)
            except (BlockingIOError, InterruptedError):
                return
            now = time.monotonic()
            accepted_at, sent_at, _slot = (_STAMP.unpack(packet) if len(packet) == _STAMP.size
                                           else (now, 0.0, -1))
            for fd in fds:
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                if now - sent_at > self.hold_s:
                    self.stats.handoffs_expired += 1
                    refuse_raw(conn, "503 Service Unavailable", "draining",
                               "the worker owning this session was restarting", 1)
                    continue
                self.stats.adopted += 1
                self.serve(conn, accepted_at)



class _Peek:
    """Waits, without consuming, until a connection's request line is complete.

    With ``proxy_protocol`` the PROXY header in front of the request is parsed from the
    peeked bytes and then consumed (exactly its length), so whichever worker serves the
    connection reads the request line first; a connection whose first bytes cannot be
    a PROXY header is answered 400 and closed.
    """

    __slots__ = ("accepted_at", "acceptor", "client", "conn", "deadline", "delay",
                 "proxied", "timer", "watching")

    def __init__(self, acceptor: Acceptor, conn: socket.socket) -> None:
        self.acceptor = acceptor
        self.conn = conn
        self.accepted_at = time.monotonic()
        self.deadline = acceptor._loop.time() + acceptor.peek_timeout_s
        self.delay = _PEEK_RETRY_FIRST_S
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False
        self.proxied = not acceptor.proxy_protocol  # no header expected, or consumed
        self.client: tuple[str, int] | None = None

    def attempt(self) -> None:
        loop = self.acceptor._loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watching:
            loop.remove_reader(self.conn.fileno())
            self.watching = False
        try:
            data = self.conn.recv(self.acceptor.peek_size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            self._finish_closed()
            return
        if data == b"":
            self._finish_closed()
            return
        if data is not None and not self.proxied:
            data = self._strip_proxy_header(data)
            if data == b"":
                return  # refused and closed, or waiting for the rest of the header
        if data is not None and len(data) > MAX_REQUEST_LINE:
            data = data[:MAX_REQUEST_LINE]
        if data is None:
            # Nothing yet: wake on the first byte (or the deadline).
            loop.add_reader(self.conn.fileno(), self.attempt)
            self.watching = True
            self.timer = loop.call_at(self.deadline, self._expire)
            return
        result = route_request(data)
        if result.route is Route.NEED_MORE:
            # Bytes are there but the line is not complete: poll with backoff (a readable
            # socket would wake a reader at once, since peeking leaves the bytes queued).
            if loop.time() >= self.deadline:
                self._expire()
                return
            self.timer = loop.call_later(self.delay, self.attempt)
            self.delay = min(self.delay * 2, _PEEK_RETRY_MAX_S)
            return
        self._done()
        self.acceptor.route(self.conn,
                            result.session if result.route is Route.SESSION else None,
                            self.accepted_at, control=result.route is Route.CONTROL)

    def _strip_proxy_header(self, data: bytes) -> bytes | None:
        """Parse and consume the PROXY header at the start of ``data``; return the bytes
        after it (None if there are none yet), or b"" when this attempt is over (the
        connection was refused, or the header is incomplete and a retry is scheduled)."""
        acceptor = self.acceptor
        try:
            header = parse_proxy_header(data)
        except ProxyHeaderError as e:
            acceptor.stats.proxy_refused += 1
            log_event(log, "proxy.refused", level=logging.DEBUG, detail=str(e))
            self._done()
            refuse_raw(self.conn, "400 Bad Request", "bad_request",
                       "a PROXY protocol header is required before the request", 1)
            return b""
        if header is None:
            if acceptor._loop.time() >= self.deadline:
                self._expire()
            else:
                self.timer = acceptor._loop.call_later(self.delay, self.attempt)
                self.delay = min(self.delay * 2, _PEEK_RETRY_MAX_S)
            return b""
        try:
            consumed = self.conn.recv(header.length)  # queued already: returns it whole
        except OSError:
            consumed = b""
        if len(consumed) != header.length:
            self._finish_closed()
            return b""
        self.proxied = True
        self.client = header.source
        acceptor.stats.proxy_headers += 1
        log_event(log, "connection.proxied", level=logging.DEBUG, slot=acceptor.slot,
                  version=header.version,
                  client=None if header.source is None else
                  f"{header.source[0]}:{header.source[1]}")
        return data[header.length:] or None

    def _expire(self) -> None:
        if self.watching:
            self.acceptor._loop.remove_reader(self.conn.fileno())
            self.watching = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.acceptor.stats.peek_timeouts += 1
        self._done()
        refuse_raw(self.conn, "408 Request Timeout", "bad_request",
                   "no complete request line in time", 1)

    def _finish_closed(self) -> None:
        self._done()
        self.conn.close()

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.acceptor._pending.discard(self)
