"""A test peer that stays in its session across relay restarts, and a group of them.

:class:`ReconnectingPeer` joins like a Beach client: it keeps one token and one
``peer_id`` for its whole life, sends a numbered data frame every ``send_interval_s``
and counts the numbered frames its counterparts send. When the relay closes it with
1012 (after a ``draining`` event) it waits the event's ``reconnect_after_ms`` and
reconnects; when the connection drops without a close it reconnects at once. Every
loss and every attempt after it is recorded (:class:`Reconnect`), so a test can state
exactly what "no failed reconnect" means for it.

Other closes (e.g. 4004 REPLACED, 4003 SESSION_FULL) end the peer: they are not a
restart and the test should see them (:attr:`ReconnectingPeer.ended`).

:meth:`ReconnectingPeer.stop` cancels the peer's task and waits at most
:data:`STOP_TIMEOUT_S` for it. The task never swallows that cancel: it waits for its
cancelled sender with :func:`asyncio.wait` (which does not raise the sender's
``CancelledError``), and wherever an error caught on the way could be a cancel in disguise
it checks ``current_task().cancelling()`` and lets the cancel through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rescue.frames import Kind, decode_frame, encode_frame
from tests.support.client import RECEIVE_TIMEOUT_S, client_hello, open_ws

RESTART_CLOSE = 1012
POLL_INTERVAL_S = 0.02
STOP_TIMEOUT_S = 10.0  # > the 5 s a cancelled join may spend closing its half-open socket
CLOSE_TIMEOUT_S = 5.0


def _raise_if_cancelled() -> None:
    """Re-raise a cancel of the current task that something on the way turned into an
    error or a return (the task's ``cancelling()`` count stays up until it ends)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def unlimited_http() -> aiohttp.ClientSession:
    """A client session without aiohttp's 100-connection pool limit (for many peers)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


@dataclass
class Reconnect:
    """One lost connection and the attempts that followed it."""

    lost_at: float  # loop time the connection was found closed
    cause: str  # "close 1012 SERVER_SHUTDOWN" or "dropped (...)"
    delay_ms: int  # the reconnect_after_ms honoured before the first attempt
    failed_attempts: list[str] = field(default_factory=list)  # why each refused attempt failed
    joined_at: float | None = None  # loop time the hello was answered
    gave_up: bool = False  # no join within the peer's give_up_s

    @property
    def succeeded(self) -> bool:
        """True once a new connection's hello was answered."""
        return self.joined_at is not None

    @property
    def took_s(self) -> float | None:
        """Seconds from the loss to the new hello, minus the honoured delay."""
        if self.joined_at is None:
            return None
        return self.joined_at - self.lost_at - self.delay_ms / 1000


class ReconnectingPeer:
    """One peer (host or participant) that reconnects on 1012 or on a dropped connection.

    ``give_up_s`` bounds each reconnect: a peer still not joined that long after the
    loss (plus the honoured delay) stops and records the reconnect as failed.
    """

    stop_timeout_s: float = STOP_TIMEOUT_S  # how long stop() waits for the cancelled task

    def __init__(self, http: aiohttp.ClientSession, relay: Any, session_id: str, role: str,
                 peer_id: str, *, send_interval_s: float = 0.1, retry_s: float = 0.05,
                 give_up_s: float = 10.0) -> None:
        self.http = http
        self.relay = relay
        self.session_id = session_id
        self.role = role
        self.peer_id = peer_id
        self.token: str = relay.mint(session_id)
        self.send_interval_s = send_interval_s
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self.connects = 0
        self.connection_ids: list[str] = []
        self.reconnects: list[Reconnect] = []
        self.closes: list[tuple[int, str]] = []
        self.drainings: list[dict[str, Any]] = []
        self.sent = 0
        self.received = 0
        self.received_at_connect = 0  # `received` when the current connection was made
        self.last_number: dict[str, int] = {}  # highest frame number seen per sender
        self.ended: str | None = None  # why the peer stopped for good (not by stop())
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join (the first attempt must succeed) and start exchanging frames."""
        self._ws = await self._join_once()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the exchange, wait up to :attr:`stop_timeout_s` for it to end, and close
        the connection. Raises TimeoutError if the task is still running then, or the
        exception the task ended with (a bug in the peer); a cancel of the caller is never
        swallowed."""
        self._stopping = True
        task = self._task
        try:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=self.stop_timeout_s)
            if task is not None and not task.done():
                raise TimeoutError(f"{self.peer_id}: task still running {self.stop_timeout_s}s "
                                   f"after its cancel: {describe(self)}")
            if task is not None and not task.cancelled():
                task.result()  # re-raise what ended it, if anything did
        finally:  # also when the caller is cancelled while waiting
            if self._ws is not None:
                with contextlib.suppress(Exception):  # not CancelledError: not swallowed
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._ws.close()

    @property
    def connected(self) -> bool:
        """True while the peer holds an open connection."""
        return self._ws is not None and not self._ws.closed

    @property
    def received_since_connect(self) -> int:
        """Frames received on the current connection."""
        return self.received - self.received_at_connect

    @property
    def failed_reconnects(self) -> list[Reconnect]:
        """Reconnects that gave up (no join within ``give_up_s``)."""
        return [r for r in self.reconnects if r.gave_up]

    # --- connecting ------------------------------------------------------------------------
    async def _join_once(self) -> aiohttp.ClientWebSocketResponse:
        """One attempt: upgrade and hello; raises on any refusal."""
        ws = await open_ws(self.http, self.relay.ws_url(self.session_id, self.token))
        try:
            await ws.send_str(client_hello(self.session_id, self.role, self.peer_id))
            msg = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"no server_hello: {msg.type.name} {msg.data!r} "
                                      f"{msg.extra!r}")
            hello = json.loads(msg.data)
            if hello.get("type") != "server_hello":
                raise ConnectionError(f"expected server_hello, got {hello}")
        except BaseException:
            await ws.close()
            raise
        self.connects += 1
        self.connection_ids.append(str(hello["connection_id"]))
        self.received_at_connect = self.received
        return ws

    async def _reconnect(self, record: Reconnect) -> aiohttp.ClientWebSocketResponse | None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(record.delay_ms / 1000)  # the relay's hint, as a client honours it
        deadline = loop.time() + self.give_up_s
        while True:
            try:
                ws = await self._join_once()
            except aiohttp.WSServerHandshakeError as e:
                record.failed_attempts.append(f"HTTP {e.status}: {e.message}")
            except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as e:
                record.failed_attempts.append(f"{type(e).__name__}: {e}")
            else:
                record.joined_at = loop.time()
                return ws
            _raise_if_cancelled()  # the failure may have been our cancel, turned into an error
            if loop.time() >= deadline:
                record.gave_up = True
                return None
            await asyncio.sleep(self.retry_s)

    # --- exchanging ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._ws is not None:
            ws = self._ws
            sender = loop.create_task(self._send_loop(ws))
            try:
                cause, delay_ms, restart = await self._receive_loop(ws)
            except Exception as e:  # a bug in the peer or garbage from the relay: say so
                cause, delay_ms, restart = f"receive failed: {e!r}", 0, False
            except BaseException:  # our cancel: end the sender, let the cancel through
                await _end_sender(sender)
                raise
            if (error := await _end_sender(sender)) is not None:  # a cancel here propagates
                raise error  # the sender failed: a bug in the peer
            _raise_if_cancelled()
            if not restart:
                self.ended = cause
                return
            record = Reconnect(lost_at=loop.time(), cause=cause, delay_ms=delay_ms)
            self.reconnects.append(record)
            self._ws = await self._reconnect(record)
            if self._ws is None:
                self.ended = f"gave up reconnecting after {cause}"

    async def _send_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            while not ws.closed:
                self.sent += 1
                payload = f"{self.peer_id}#{self.sent}".encode()
                await ws.send_bytes(encode_frame(Kind.DATA, self.sent % 2**32, payload))
                await asyncio.sleep(self.send_interval_s)

    async def _receive_loop(self, ws: aiohttp.ClientWebSocketResponse
                            ) -> tuple[str, int, bool]:
        """Read until the connection ends; return (cause, delay_ms, reconnect?)."""
        delay_ms = 0
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = decode_frame(msg.data)
                sender, _, number = frame.payload.decode().partition("#")
                self.received += 1
                self.last_number[sender] = max(self.last_number.get(sender, 0), int(number))
            elif msg.type is aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                if event.get("type") == "draining":
                    self.drainings.append(event)
                    delay_ms = int(event["reconnect_after_ms"])
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                code, reason = int(msg.data), str(msg.extra or "")
                self.closes.append((code, reason))
                return f"close {code} {reason}", delay_ms, code == RESTART_CLOSE
            else:  # CLOSED, CLOSING, ERROR: the TCP connection went away without a close
                code = ws.close_code if ws.close_code is not None else -1
                if self._stopping:
                    return "stopped", 0, False
                return f"dropped ({msg.type.name}, code {code})", 0, True


async def _end_sender(sender: asyncio.Task[None]) -> BaseException | None:
    """Cancel ``sender``, wait for it to end and return what it failed with (None if it
    was cancelled or returned). ``asyncio.wait`` never raises the sender's
    ``CancelledError``, so only a cancel of the *waiting* task propagates from here."""
    sender.cancel()
    await asyncio.wait({sender})
    return None if sender.cancelled() else sender.exception()


class Swarm:
    """A set of :class:`ReconnectingPeer` with bounded waits over all of them."""

    def __init__(self, peers: Iterable[ReconnectingPeer]) -> None:
        self.peers = list(peers)

    async def start(self, concurrency: int = 50) -> None:
        """Start every peer, at most ``concurrency`` handshakes at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def start_one(peer: ReconnectingPeer) -> None:
            async with gate:
                await peer.start()

        await asyncio.gather(*(start_one(p) for p in self.peers))

    async def stop(self) -> None:
        """Stop every peer."""
        await asyncio.gather(*(p.stop() for p in self.peers), return_exceptions=True)

    async def wait_all(self, check: Callable[[ReconnectingPeer], bool], what: str,
                       within_s: float) -> None:
        """Wait until ``check`` holds for every peer; fail naming the laggards otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            lagging = [p for p in self.peers if not check(p)]
            if not lagging:
                return
            ended = [p for p in lagging if p.ended is not None]
            if ended or loop.time() >= deadline:
                sample = [describe(p) for p in (ended or lagging)[:5]]
                raise AssertionError(f"{len(lagging)} of {len(self.peers)} peers not {what} "
                                     f"after {within_s}s (ended: {len(ended)}): {sample}")
            await asyncio.sleep(POLL_INTERVAL_S)

    def marks(self) -> dict[ReconnectingPeer, int]:
        """Each peer's received count now (to wait for progress past it)."""
        return {p: p.received for p in self.peers}


def describe(peer: ReconnectingPeer) -> str:
    """A one-line summary of a peer's history, for assertion messages."""
    return (f"{peer.session_id}/{peer.role}: connects={peer.connects} sent={peer.sent} "
            f"received={peer.received} since_connect={peer.received_since_connect} "
            f"closes={peer.closes} ended={peer.ended!r} reconnects="
            f"{[(r.cause, r.delay_ms, r.failed_attempts, r.took_s) for r in peer.reconnects]}")
