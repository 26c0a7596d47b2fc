"""The asyncio channel through beach-rescue: connect, reconnect, resume, and the public API.

:class:`Channel` drives a sans-I/O :mod:`rescue.client.peering` engine over one aiohttp
WebSocket at a time. It reconnects on its own — after a ``draining`` event (waiting its
``reconnect_after_ms``), a dropped connection or a recoverable close code — with full-jitter
backoff bounded by :class:`~rescue.client.backoff.BackoffPolicy`, and raises a typed
:mod:`rescue.client.errors` exception when it cannot go on.

Typical use::

    async with rescue.client.connect("ws://relay:9443/ws", session_id="s1", role="host",
                                     psk=psk, token=token) as channel:
        await channel.send(b"hello")
        async for data in channel:
            ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from rescue.client.backoff import Backoff, BackoffPolicy
from rescue.client.e2e import SUITES_ALL, Suite
from rescue.client.errors import (
    RECOVERABLE_CLOSES,
    ChannelError,
    FallbackPaused,
    ReconnectFailed,
    RelayRefused,
    TokenExpired,
    closed_error,
)
from rescue.client.grants import ControlPlaneError, StaticToken, TokenSource
from rescue.client.peering import (
    HostEngine,
    Message,
    ParticipantEngine,
    PeerNotice,
    StreamLimits,
)
from rescue.client.transport import TransportKind
from rescue.codes import CloseCode
from rescue.frames import MAX_PAYLOAD, Kind, decode_frame, encode_frame
from rescue.hello import (
    ClientHello,
    Draining,
    HelloError,
    PeerJoined,
    PeerLeft,
    ServerHello,
    encode_client_hello,
    parse_server_message,
)
from rescue.logs import log_event

log = logging.getLogger("rescue.client")

Role = Literal["host", "participant"]
ERROR_HEADER = "X-Beach-Rescue-Error"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_HEARTBEAT = encode_frame(Kind.HEARTBEAT, 0, b"")
RETURN_GRACE_S = 5.0
"""How long :meth:`Channel.finish` waits for a counterpart that finished its stream and
left to come back (a reconnect) before it stops waiting for acknowledgements."""


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """Tunables of a channel; the defaults suit an interactive terminal session."""

    peer_id: str | None = None  # stable across reconnects; random when None
    suite: Suite = Suite.AES_256_GCM  # the host's choice for its broadcast stream
    suites: frozenset[Suite] = SUITES_ALL  # what a participant offers
    limits: StreamLimits = field(default_factory=StreamLimits)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    connect_timeout_s: float = 10.0
    heartbeat_s: float | None = None  # None: the relay's heartbeat_s from server_hello
    liveness_intervals: float = 2.5  # silent heartbeats before a connection counts as dead
    linger_s: float = 10.0  # how long close() waits for the peer to acknowledge
    max_receive_bytes: int = 8 << 20  # undelivered messages before reading pauses


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """A step in the channel's life, for logs and the application's ``on_event``."""

    name: str  # connected, disconnected, draining, peer.ready, peer.closed, peer.refused, ...
    fields: dict[str, Any]


class ChannelEnded(ChannelError):
    """The conversation is over: the counterpart closed it, or this side did."""


@dataclass
class _Ending:
    """How one connection ended."""

    code: int | None
    reason: str
    draining_ms: int | None = None


def new_peer_id(role: str) -> str:
    """A random peer id (``h-``/``p-`` and 16 URL-safe characters)."""
    return f"{role[0]}-{secrets.token_urlsafe(12)}"


class Channel:
    """An end-to-end encrypted, resumable message channel through the relay."""

    def __init__(self, relay_url: str | None, session_id: str, role: Role, psk: bytes,
                 tokens: TokenSource, *, options: ChannelOptions | None = None,
                 http: aiohttp.ClientSession | None = None,
                 on_event: Callable[[ChannelEvent], None] | None = None) -> None:
        if role not in ("host", "participant"):
            raise ValueError("role must be 'host' or 'participant'")
        self.options = opts = options or ChannelOptions()
        self.relay_url = relay_url
        self.session_id = session_id
        self.role = role
        self.peer_id = opts.peer_id or new_peer_id(role)
        self._engine: HostEngine | ParticipantEngine = (
            HostEngine(session_id, self.peer_id, psk, opts.suite, opts.limits) if role == "host"
            else ParticipantEngine(session_id, self.peer_id, psk, opts.suites, opts.limits))
        self._tokens = tokens
        self._http = http
        self._own_http = http is None
        self._on_event = on_event
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        self._tick_wake = asyncio.Event()
        self._received: deque[Message] = deque()
        self._received_bytes = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._finished = False
        self._task: asyncio.Task[None] | None = None
        self.connections = 0  # successful hellos, the first one included

    # --- the public surface ---------------------------------------------------------------------

    @property
    def transport(self) -> TransportKind:
        """Always the WebSocket fallback: this channel runs through beach-rescue."""
        return TransportKind.WEBSOCKET_FALLBACK

    @property
    def connected(self) -> bool:
        """True while a connection to the relay is open."""
        return self._ws is not None

    @property
    def failure(self) -> BaseException | None:
        """What ended the channel against its will, if anything did."""
        return self._failure

    @property
    def counterparts(self) -> list[str]:
        """Peer ids this side holds keys with (a host's participants, a participant's host)."""
        engine = self._engine
        if isinstance(engine, HostEngine):
            return engine.participants
        return [] if engine.link is None else [engine.link.host_peer_id]

    @property
    def ready(self) -> bool:
        """True while keys with a counterpart exist (messages can be sealed)."""
        return self._engine.ready

    async def start(self) -> None:
        """Connect for the first time; raise what stops the first connection for good.

        Transient failures (a 429 or 5xx from the relay or the token source's control
        plane, connection errors) are retried with backoff until ``give_up_after_s``;
        then :class:`ReconnectFailed` is raised.
        """
        if self._task is not None:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            await self._wait(lambda: self.connections > 0)
        except BaseException:
            await self.close()  # a failed start leaves nothing open
            raise

    async def wait_ready(self) -> None:
        """Wait until keys with a counterpart are agreed (raises the channel's failure)."""
        await self._wait(lambda: self._engine.ready)

    async def send(self, data: bytes) -> None:
        """Seal and send one message; waits for keys and for room in the replay buffer.

        A host's message goes to every participant holding keys. Raises the channel's
        failure, or :class:`ChannelEnded` after :meth:`close`.
        """
        if self._finished:
            raise ChannelEnded("this side already finished its stream")
        size = len(data)
        await self._wait(lambda: self._engine.can_send(size), sending=True)
        self._engine.send_message(bytes(data))
        await self._flush()

    async def receive(self) -> Message:
        """The next message and its sender; :class:`ChannelEnded` once the stream ended."""
        await self._wait(lambda: bool(self._received) or self._engine.ended is not None)
        if not self._received:
            raise ChannelEnded(self._engine.ended or "the channel ended")
        message = self._received.popleft()
        self._received_bytes -= len(message.data)
        async with self._changed:
            self._changed.notify_all()
        return message

    async def messages(self) -> AsyncIterator[Message]:
        """Every message with its sender, until the conversation ends."""
        while True:
            try:
                yield await self.receive()
            except ChannelEnded:
                return

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Every message's bytes, until the conversation ends."""
        async for message in self.messages():
            yield message.data

    async def finish(self, reason: str = "") -> bool:
        """End this side's stream (half-close) and wait up to ``linger_s`` for its acknowledgement.

        Messages from the other side keep arriving until it finishes too. Returns True when
        everything sent was acknowledged, False when the linger ran out or the counterpart
        finished and stayed away for ``RETURN_GRACE_S``; raises the channel's failure if it
        fails meanwhile. Idempotent.
        """
        return await self._finish(reason, close_frame_matters=True)

    async def _finish(self, reason: str, *, close_frame_matters: bool) -> bool:
        if self._failure is None and self._engine.ready and self._task is not None \
                and not self._finished:
            self._finished = True
            self._engine.send_close(reason)
            await self._flush()
        engine = self._engine
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.linger_s):
                while engine.unacked:
                    await self._wait(lambda: engine.unacked == 0 or engine.abandoned)
                    if engine.unacked == 0:
                        break
                    if not close_frame_matters and self._finished and engine.unacked == 1:
                        break  # only our close frame is unacknowledged: nothing is at risk
                    # Gone after finishing its stream, as far as the relay's events say;
                    # but a reconnect (its or ours) looks the same for a moment.
                    try:
                        async with asyncio.timeout(RETURN_GRACE_S):
                            await self._wait(lambda: engine.unacked == 0
                                             or not engine.abandoned)
                    except TimeoutError:
                        break  # still gone: nobody will acknowledge the rest
        return engine.unacked == 0

    async def close(self, reason: str = "") -> None:
        """:meth:`finish` this side's stream, then disconnect; idempotent.

        Unlike :meth:`finish` it does not wait for a departed counterpart to come back
        when nothing but its own close frame is unacknowledged.
        """
        if self._closing:
            return
        if self._task is not None and self._failure is None:
            with contextlib.suppress(ChannelError):  # the failure stays in `failure`
                await self._finish(reason, close_frame_matters=False)
                self._engine.send_leave()
                await self._flush()
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(code=CloseCode.NORMAL, message=b"NORMAL")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_http and self._http is not None:
            await self._http.close()
        async with self._changed:
            self._changed.notify_all()

    async def __aenter__(self) -> Channel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- waiting on state ------------------------------------------------------------------------

    async def _wait(self, predicate: Callable[[], bool], *, sending: bool = False) -> None:
        async with self._changed:
            while not predicate():
                if self._failure is not None:
                    raise self._failure
                if self._closing:
                    raise ChannelEnded("the channel was closed")
                if sending and self._engine.ended is not None and self.role == "participant":
                    raise ChannelEnded(self._engine.ended)
                await self._changed.wait()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _emit(self, name: str, **fields: Any) -> None:
        log_event(log, f"channel.{name}", session_id=self.session_id, role=self.role,
                  peer_id=self.peer_id, **fields)
        if self._on_event is not None:
            self._on_event(ChannelEvent(name, fields))

    async def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            self._emit("failed", error=type(error).__name__, detail=str(error))
        await self._notify()

    # --- the connection loop ---------------------------------------------------------------------

    @property
    def _renewable(self) -> bool:
        return not isinstance(self._tokens, StaticToken)

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: fail loudly rather than leave start() waiting
            await self._fail(ChannelError(f"the channel's connection loop failed: {e!r}"))

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.options.backoff)
        fresh, floor_s = False, 0.0
        cause: BaseException
        while not self._closing:
            loop_now = time.monotonic()
            try:
                grant = await self._tokens.grant(fresh=fresh)
                ws, hello = await self._connect(grant.relay_url, grant.token)
            except (FallbackPaused, TokenExpired) as e:
                await self._fail(e)
                return
            except ControlPlaneError as e:  # 429/5xx (e.g. its store is down): retry
                if e.status not in _RETRYABLE_STATUS:
                    await self._fail(e)
                    return
                floor_s = e.retry_after_s or 0.0
                cause = e
            except RelayRefused as e:
                if e.error == "token_expired" and not fresh and self._renewable:
                    fresh = True
                    continue
                if e.status not in _RETRYABLE_STATUS:
                    await self._fail(_refusal_error(e))
                    return
                floor_s = e.retry_after_s or 0.0
                cause = e
            except (OSError, aiohttp.ClientError, TimeoutError, HelloError) as e:
                cause = e
                fresh = self._renewable  # the node may be gone: ask where to go now
            except ChannelError as e:  # no relay URL, or a fatal close before the hello
                await self._fail(e)
                return
            else:
                fresh = False
                backoff.succeeded()
                ending = await self._serve(ws, hello)
                if self._closing or self._failure is not None:
                    return
                error = self._judge(ending)
                if isinstance(error, TokenExpired) and self._renewable:
                    fresh, error = True, None
                if error is not None:
                    await self._fail(error)
                    return
                floor_s = (ending.draining_ms or 0) / 1000
                cause = ChannelError(f"connection ended: {ending.code} {ending.reason}")
                # A node that drains or goes away may not take us back: with control-plane
                # routing a fresh grant names the node to use now.
                moved = ending.draining_ms is not None or ending.code == CloseCode.GOING_AWAY
                fresh = fresh or (moved and self._renewable)
                loop_now = time.monotonic()
            backoff.lost(loop_now)
            delay = backoff.next_delay(time.monotonic(), at_least_s=floor_s)
            floor_s = 0.0
            if delay is None:
                failure = ReconnectFailed(
                    f"could not reconnect within {self.options.backoff.give_up_after_s} s: "
                    f"{cause}")
                failure.__cause__ = cause
                await self._fail(failure)
                return
            self._emit("reconnecting", delay_ms=round(delay * 1000), cause=str(cause))
            await asyncio.sleep(delay)

    def _judge(self, ending: _Ending) -> ChannelError | None:
        code = ending.code
        if code is None or code in RECOVERABLE_CLOSES or code == 1006:
            return None
        return closed_error(code, ending.reason)

    async def _connect(self, relay_url: str | None,
                       token: str) -> tuple[aiohttp.ClientWebSocketResponse, ServerHello]:
        url = relay_url or self.relay_url
        if url is None:
            raise ChannelError("no relay URL: pass one or use a control plane that returns it")
        assert self._http is not None
        timeout = self.options.connect_timeout_s
        try:
            ws = await self._http.ws_connect(
                url, params={"session": self.session_id},
                headers={"Authorization": f"Bearer {token}"}, autoping=True, heartbeat=None,
                compress=0, max_msg_size=MAX_PAYLOAD + 64,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout))
        except aiohttp.WSServerHandshakeError as e:
            headers: Mapping[str, str] = e.headers or {}
            retry = headers.get("Retry-After")
            raise RelayRefused(e.status, headers.get(ERROR_HEADER, "unknown"), e.message,
                               float(retry) if retry and retry.isdigit() else None) from None
        try:
            hello = ClientHello(type="client_hello", session_id=self.session_id, role=self.role,
                                protocol_version=1, peer_id=self.peer_id,
                                client_nonce=base64.b64encode(os.urandom(16)).decode(),
                                compression=["none"])
            await ws.send_str(encode_client_hello(hello))
            msg = await ws.receive(timeout=timeout)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                code = ws.close_code
                if code is not None and code not in RECOVERABLE_CLOSES:
                    raise closed_error(code, str(msg.extra or ""))
                raise ConnectionResetError(f"no server_hello: {msg.type.name} {code}")
            answer = parse_server_message(msg.data)
            if not isinstance(answer, ServerHello):
                raise HelloError(CloseCode.PROTOCOL_ERROR, "expected server_hello")
        except BaseException:
            await ws.close()
            raise
        return ws, answer

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, hello: ServerHello) -> _Ending:
        self.connections += 1
        self._ws = ws
        engine = self._engine
        engine.connected(time.monotonic())
        self._emit("connected", connection_id=hello.connection_id, reconnect=self.connections > 1)
        await self._notify()
        heartbeat_s = self.options.heartbeat_s or float(hello.heartbeat_s)
        silence_s = heartbeat_s * self.options.liveness_intervals
        ticker = asyncio.get_running_loop().create_task(self._tick(ws, heartbeat_s))
        ending = _Ending(None, "")
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=silence_s)
                except TimeoutError:
                    ending.reason = f"nothing heard for {silence_s:.1f} s"
                    break
                if msg.type is aiohttp.WSMsgType.BINARY:
                    frame = decode_frame(msg.data)
                    if frame.kind is not Kind.HEARTBEAT:
                        engine.on_frame(frame, time.monotonic())
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    self._on_text(msg.data, ending)
                else:
                    ending.code = ws.close_code
                    ending.reason = str(msg.extra or "") if msg.type is \
                        aiohttp.WSMsgType.CLOSE else msg.type.name
                    break
                await self._after_input()
        except ChannelError as e:  # integrity or handshake failure: never carry on silently
            if not self._closing:
                await self._flush()  # e.g. the reject that tells the host about a wrong PSK
                await self._fail(e)
        except Exception as e:  # a malformed frame from the relay, or a bug
            await self._fail(ChannelError(f"channel failed: {e!r}"))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._ws = None
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            self._emit("disconnected", code=ending.code, reason=ending.reason)
            await self._notify()
        return ending

    def _on_text(self, data: str, ending: _Ending) -> None:
        try:
            event = parse_server_message(data)
        except HelloError:
            return  # unknown event types are ignored, as the contract asks
        now = time.monotonic()
        if isinstance(event, PeerJoined):
            self._engine.peer_joined(event.role, event.peer_id, now)
        elif isinstance(event, PeerLeft):
            self._engine.peer_left(event.role, event.peer_id, event.reason, now)
        elif isinstance(event, Draining):
            ending.draining_ms = event.reconnect_after_ms
            self._emit("draining", reconnect_after_ms=event.reconnect_after_ms)

    async def _after_input(self) -> None:
        engine = self._engine
        for message in engine.messages_received():
            self._received.append(message)
            self._received_bytes += len(message.data)
        self._report(engine.notices)
        engine.notices.clear()
        await self._flush()
        self._tick_wake.set()
        await self._notify()
        if self._received_bytes > self.options.max_receive_bytes:
            await self._wait(lambda: self._received_bytes <= self.options.max_receive_bytes)

    def _report(self, notices: list[PeerNotice]) -> None:
        for notice in notices:
            self._emit(f"peer.{notice.what}", peer=notice.peer_id, detail=notice.detail)

    async def _tick(self, ws: aiohttp.ClientWebSocketResponse, heartbeat_s: float) -> None:
        next_beat = time.monotonic() + heartbeat_s
        while not ws.closed:
            now = time.monotonic()
            if now >= next_beat:
                await self._write([_HEARTBEAT])
                next_beat = now + heartbeat_s
            deadline = self._engine.tick(now)
            self._report(self._engine.notices)
            self._engine.notices.clear()
            await self._flush()
            wake = min(next_beat, deadline) if deadline is not None else next_beat
            self._tick_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wake - time.monotonic(), 0.001)):
                    await self._tick_wake.wait()

    async def _flush(self) -> None:
        async with self._write_lock:
            frames = self._engine.data_to_send()
            await self._write_locked(frames)

    async def _write(self, frames: list[bytes]) -> None:
        async with self._write_lock:
            await self._write_locked(frames)

    async def _write_locked(self, frames: list[bytes]) -> None:
        ws = self._ws
        if ws is None or ws.closed or not frames:
            return  # stream frames wait in the replay buffer; the rest is repeated on resume
        try:
            for frame in frames:
                await ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            return  # the reader sees the connection end and reconnects


def _refusal_error(e: RelayRefused) -> ChannelError:
    if e.error == "fallback_paused":
        return FallbackPaused(4008, "fallback_paused")
    if e.error == "token_expired":
        return TokenExpired(4009, "token_expired")
    return e


def connect(relay_url: str | None = None, *, session_id: str, role: Role, psk: bytes,
            token: str | None = None, tokens: TokenSource | None = None,
            options: ChannelOptions | None = None, http: aiohttp.ClientSession | None = None,
            on_event: Callable[[ChannelEvent], None] | None = None) -> Channel:
    """A channel to use as ``async with connect(...) as channel`` (or ``await ch.start()``).

    Give either a ``token`` or a ``tokens`` source (e.g.
    :class:`~rescue.client.grants.ControlPlaneTokens`); without ``relay_url`` the source's
    grants must name the relay.
    """
    if (token is None) == (tokens is None):
        raise ValueError("give exactly one of token= and tokens=")
    source = tokens if tokens is not None else StaticToken(token or "")
    return Channel(relay_url, session_id, role, psk, source, options=options, http=http,
                   on_event=on_event)
