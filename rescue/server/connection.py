"""One upgraded WebSocket connection: the asyncio protocol the relay reads frames through.

After the ``101`` the relay takes the transport from aiohttp (:func:`take_over`) and puts a
:class:`WsConnection` on it. Bytes arrive in :meth:`WsConnection.data_received`, go through
the sans-I/O :class:`~rescue.wsreader.FrameReader`, and each complete message is handed to
the connection's :class:`~rescue.server.peer.Peer` synchronously: no task, no queue and no
per-connection timer while a connection is idle, which is what keeps an idle connection
small and a relayed message cheap.

Reading stops (``hold``) while the relay waits for this sender's receivers to drain, and
while the hello is being decided; frames already buffered wait in the reader, so order is
kept. Writing is watched through ``pause_writing``/``resume_writing`` with the transport's
limits set to the relay's water marks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rescue.codes import CloseCode
from rescue.wsframe import OP_CLOSE, close_frame
from rescue.wsreader import FrameReader, ReadError

if TYPE_CHECKING:
    from rescue.server.peer import Peer

#: What :meth:`WsConnection.first_message` returns: a message, or None if the client left.
Message = tuple[int, bytes]


class WsConnection(asyncio.Protocol):
    """The relay's end of one WebSocket connection after the upgrade."""

    __slots__ = ("_first", "_waiters", "close_received", "close_sent", "held", "lost",
                 "peer", "reader", "transport", "writing_paused")

    def __init__(self, transport: asyncio.Transport, max_message_bytes: int) -> None:
        self.transport = transport
        self.reader = FrameReader(max_message_bytes)
        self.peer: Peer | None = None
        self.writing_paused = False
        self.held = False  # frames are not being handed on (hello pending, flow control)
        self.lost = False
        self.close_sent = False
        self.close_received = False
        # The hello: a message or error read before first_message() was called, or the
        # future it waits on. None once the peer is attached.
        self._first: Any = None
        # Futures waiting for the write buffer to drain or for the client's close frame.
        self._waiters: list[asyncio.Future[None]] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if not self.held:
            self._process()

    def eof_received(self) -> bool | None:
        return None  # a half-closed client is a gone client: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        first = self._first
        if isinstance(first, asyncio.Future) and not first.done():
            first.set_result(None)
        peer, self.peer = self.peer, None  # the peer refers to this connection: no cycle
        if peer is not None and not peer.closing:
            peer.close(CloseCode.NORMAL, "closed")

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    # (aiohttp's request handler feeds these while the transport is being taken over)
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Take bytes aiohttp read past the upgrade request (its payload-parser interface)."""
        if data:
            self.data_received(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp's payload-parser interface; the end of the connection comes by
        :meth:`connection_lost` instead."""

    # --- reading ---------------------------------------------------------------------
    def _process(self) -> None:
        """Hand on buffered messages until the reader needs more bytes or reading is held."""
        reader = self.reader
        try:
            while not self.held:
                message = reader.next_message()
                if message is None:
                    return
                peer = self.peer
                if self.close_sent:
                    if message[0] == OP_CLOSE:  # the answer to our close: we may go
                        self.close_received = True
                        self._wake()
                elif peer is None:
                    self._deliver_first(message)
                else:
                    peer.relay.on_message(peer, message[0], message[1])
        except ReadError as e:
            self.held = True  # the reader is finished: nothing more will be handed on
            peer = self.peer
            if self.close_sent:
                self.close_received = True  # no answer can be read any more: stop waiting
                self._wake()
            elif peer is None:
                self._deliver_first(e)
            else:
                peer.relay.on_read_error(peer, e)
        except Exception:
            self.held = True
            peer = self.peer
            if peer is None:
                raise
            peer.relay.on_internal_error(peer)

    def _deliver_first(self, first: Message | ReadError) -> None:
        self.hold()  # nothing more until the hello is decided and the peer attached
        waiter = self._first
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(first)
        else:
            self._first = first

    async def first_message(self, timeout_s: float) -> Message | ReadError | None:
        """The client's first message (or its framing error); None if it left first.

        Raises :class:`TimeoutError` after ``timeout_s``.
        """
        first = self._first
        if first is None and not self.lost:
            waiter: asyncio.Future[Message | ReadError | None] = (
                asyncio.get_running_loop().create_future())
            self._first = waiter
            self.release()  # what arrived with the upgrade request first, then the socket
            async with asyncio.timeout(timeout_s):
                first = await waiter
        self._first = None
        return first  # type: ignore[no-any-return]

    def attach(self, peer: Peer) -> None:
        """Start handing messages to ``peer`` (they were held since the first one)."""
        self.peer = peer
        self.release()

    def hold(self) -> None:
        """Stop reading from the client (its buffered messages wait too)."""
        if not self.held:
            self.held = True
            if not self.lost:
                self.transport.pause_reading()

    def release(self) -> None:
        """Hand on what is buffered, then read from the client again."""
        if not self.held:
            return
        self.held = False
        self._process()
        if not self.held and not self.lost:
            self.transport.resume_reading()

    # --- waiting ---------------------------------------------------------------------
    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the next wake-up (drained, close frame, lost)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``done()`` holds after a wake-up, or ``timeout_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                return
            await self._wait(left)

    async def wait_writable(self, timeout_s: float) -> None:
        """Wait until the write buffer is under the low-water mark, the connection is lost
        or closing, or ``timeout_s`` passed."""
        await self._wait_until(
            lambda: not self.writing_paused or self.lost or self.close_sent, timeout_s)

    # --- closing ---------------------------------------------------------------------
    def send_close(self, code: CloseCode) -> None:
        """Write a close frame with ``code`` and its reason (once), and keep reading only
        for the client's answer."""
        if self.close_sent:
            return
        self.close_sent = True
        self._wake()
        if not self.lost and not self.transport.is_closing():
            self.transport.write(close_frame(int(code), code.reason.encode()))
        if self.held and not self.lost:  # the client's close frame must be able to arrive
            self.held = False
            self.transport.resume_reading()
            self._process()

    async def close(self, code: CloseCode, timeout_s: float) -> None:
        """Close the WebSocket: send ``code``, wait up to ``timeout_s`` for the client's
        close frame, then close the TCP connection (abort it if its buffer does not drain)."""
        self.send_close(code)
        await self._wait_until(lambda: self.close_received or self.lost, timeout_s)
        transport = self.transport
        if self.lost:
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A receiver that stopped reading never lets the close frame out: drop it.
            asyncio.get_running_loop().call_later(timeout_s, transport.abort)


class _Detached(web.StreamResponse):
    """What the ``/ws`` handler returns once the connection is no longer aiohttp's."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def take_over(request: web.Request, upgrade_response: bytes,
              max_message_bytes: int) -> WsConnection | None:
    """Answer the upgrade with ``upgrade_response`` and move the connection from aiohttp to
    a new :class:`WsConnection`; None if the client is already gone.

    aiohttp keeps bytes read past the upgrade request until a payload parser is set; they
    are taken through that interface, so none is lost. Its request handler is then told
    the connection is over without closing it (its transport cleared first), so it forgets
    the connection and ends its task when the ``/ws`` handler returns :func:`detached`.
    """
    transport = request.transport
    protocol = request.protocol
    if transport is None or transport.is_closing():
        return None
    transport.write(upgrade_response)
    conn = WsConnection(transport, max_message_bytes)
    conn.held = True  # bytes only collect in the reader until first_message()
    protocol.set_parser(conn)  # type: ignore[arg-type]  # flushes aiohttp's tail to conn
    transport.set_protocol(conn)
    protocol.transport = None
    protocol.connection_lost(None)
    conn.held = False
    conn.hold()  # aiohttp may have resumed reading; stop until the hello is awaited
    return conn


def detached() -> web.StreamResponse:
    """The response the ``/ws`` handler returns after :func:`take_over` (aiohttp writes
    nothing for it)."""
    return _Detached(status=101)
