"""The relay of one worker: upgrade, hello, join, then forwarding each peer's messages.

The decisions live in sans-I/O modules (:mod:`rescue.admission`, :mod:`rescue.wshandshake`,
:mod:`rescue.hello`, :mod:`rescue.frames`, :mod:`rescue.sessions`, :mod:`rescue.ratelimit`);
this module carries them out. aiohttp serves the HTTP request up to the upgrade; the relay
then takes the connection over (:mod:`rescue.server.connection`) and, once the hello is
done, each message a peer sends reaches :meth:`Relay.on_message` from its connection's
``data_received``: no task per connection. Messages are written to the receivers'
transports at once (never through a queue), so order is preserved per direction, and a
receiver over its high-water mark makes the sender stop reading (TCP backpressure) until
it drains or is evicted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any, TypeVar

from aiohttp import web

from rescue import tracing
from rescue.admission import Load, UpgradeRequest, admit
from rescue.codes import CloseCode, ErrorCode, Refusal
from rescue.config import Config
from rescue.controlplane.store import Pause
from rescue.frames import FrameError, check_frame
from rescue.hello import (
    HelloError,
    encode_peer_joined,
    encode_peer_left,
    encode_server_hello,
    new_server_nonce,
    parse_client_hello,
)
from rescue.logs import log_event
from rescue.ratelimit import ConnectionRateLimit
from rescue.server.connection import WsConnection, detached, take_over
from rescue.server.peer import Peer
from rescue.server.responses import error_response, method_not_allowed, query_values
from rescue.server.stats import WorkerStats
from rescue.sessions import JoinResult, Registry, SessionFull, TooManyConnections
from rescue.tokens import CAP_TELEMETRY, TokenClaims, TokenVerifier
from rescue.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, binary_header
from rescue.wshandshake import VERSION as WS_VERSION
from rescue.wshandshake import VersionRefused, check_upgrade, switching_protocols
from rescue.wsreader import ReadError, parse_close

log = logging.getLogger("rescue.relay")

T = TypeVar("T")

_HEARTBEAT = 2


def _close_name(code: int | None) -> str:
    """The name of a close code the relay sent (``closed`` if there was none)."""
    if code is None or code not in CloseCode._value2member_map_:
        return "closed"
    return CloseCode(code).name


class Relay:
    """All relay state of one worker process and the ``GET /ws`` handler."""

    def __init__(self, config: Config, verifier: TokenVerifier,
                 owns: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self.verifier = verifier
        self.owns = owns
        self.worker_slot = 0
        self.intake: Any = None
        self.cluster: list[dict[str, Any]] = []
        self.on_request: Callable[[web.Request], None] = lambda request: None
        self.registry: Registry[Peer] = Registry(
            max_participants=config.max_participants,
            max_connections_per_session=config.max_connections_per_session,
            grace_s=config.session_grace_s)
        self.stats = WorkerStats()
        self.peers: set[Peer] = set()
        self.handshaking: set[WsConnection] = set()  # upgraded, hello not decided yet
        self.handshakes = 0
        self.draining = False
        self.pause = Pause.SOFT if config.fallback_paused else Pause.OFF
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}{secrets.token_hex(2)}"
        self._new_rate_limit = ConnectionRateLimit.factory(config)

    # --- bookkeeping ---------------------------------------------------------------
    @property
    def connections(self) -> int:
        return len(self.peers) + self.handshakes

    def load(self) -> Load:
        """The worker's load as admission sees it."""
        return Load(draining=self.draining, paused=self.pause is not Pause.OFF,
                    connections=self.connections, handshakes=self.handshakes,
                    max_connections=self.config.max_connections,
                    max_handshakes=self.config.max_handshakes)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def set_pause(self, pause: Pause) -> None:
        """Apply the kill switch: refuse new connections; on HARD also close existing ones."""
        if self.config.fallback_paused and pause is Pause.OFF:
            pause = Pause.SOFT
        previous, self.pause = self.pause, pause
        if pause is previous:
            return
        log_event(log, "kill_switch.applied", level=logging.WARNING, state=pause.value,
                  peers=len(self.peers))
        if pause is Pause.HARD:
            for peer in list(self.peers):
                peer.close(CloseCode.GUARDRAIL_TRIPPED, "paused")

    def beat_stats(self) -> dict[str, Any]:
        """The live numbers a worker reports to the supervisor every beat."""
        out: dict[str, Any] = {
            "slot": self.worker_slot, "pid": os.getpid(), "connections": self.connections,
            "peers": len(self.peers), "sessions": len(self.registry),
            "handshakes": self.handshakes, "draining": self.draining,
            "pause": self.pause.value,
            "messages_forwarded": self.stats.messages_forwarded,
            "bytes_forwarded": self.stats.bytes_forwarded,
        }
        if self.intake is not None:
            out.update(accepted=self.intake.accepted, handed_off=self.intake.handed_off,
                       adopted=self.intake.adopted,
                       handoff_failures=self.intake.handoff_failures)
        return out

    async def close_all_wait(self, timeout_s: float) -> None:
        """Wait (bounded) for the background closes started so far to finish; connections
        still in their hello are dropped."""
        self.abort_handshakes()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    def detach(self, peer: Peer, reason: str) -> None:
        """Take ``peer`` out of its session and tell its counterparts (``peer_left``)."""
        self.peers.discard(peer)
        # The member refers back to the peer (Member.conn): dropping the link here lets
        # reference counting free the connection's whole object graph when it ends,
        # instead of leaving it to a rare full collection (the worker makes those rare).
        member, peer.member = peer.member, None
        if member is None:
            return
        result = self.registry.leave(peer.session, member, asyncio.get_running_loop().time())
        if result.notify:
            event = encode_peer_left(peer.role, peer.peer_id, reason)
            for other in result.notify:
                other.write_text(event)

    # --- the handler ---------------------------------------------------------------
    def _admit(self, request: web.Request) -> web.Response | tuple[TokenClaims, Any]:
        """Decide a ``/ws`` request before the upgrade: a refusal, or (claims, session).

        On success the session holds a reservation and ``handshakes`` counts this
        connection; :meth:`handle_ws` releases both.
        """
        self.on_request(request)
        if request.method not in ("GET", "HEAD"):
            self.stats.upgrades_refused[ErrorCode.METHOD_NOT_ALLOWED.code] += 1
            return method_not_allowed(request, ("GET", "HEAD"))
        session_id, query_token = query_values(request, "session", "token")
        upgrade = UpgradeRequest(
            session=session_id, query_token=query_token,
            authorization=request.headers.get("Authorization"),
            is_websocket_upgrade=request.headers.get("Upgrade", "").lower() == "websocket")
        try:
            claims = admit(upgrade, self.load(), self.verifier, time.time())
        except Refusal as r:
            return self._refuse(r.error, r.detail, r.retry_after_s)
        if self.owns is not None and not self.owns(claims.sid):
            # Only a kept-alive connection first routed for another request gets here.
            refusal = self._refuse(ErrorCode.OVERLOADED,
                                   "this connection reached a worker that does not own the "
                                   "session; reconnect on a new connection", retry_after_s=0)
            refusal.force_close()
            return refusal
        try:
            session = self.registry.reserve(claims.sid, asyncio.get_running_loop().time())
        except TooManyConnections:
            return self._refuse(ErrorCode.RATE_LIMITED,
                                "too many connections for this session")
        self.handshakes += 1
        return claims, session

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /ws``: admit, upgrade, take the connection over, run the hello.

        Once the peer has joined, this handler returns and the connection lives on as a
        :class:`~rescue.server.connection.WsConnection` whose messages reach
        :meth:`on_message`; aiohttp no longer knows it.
        """
        admitted = self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        claims, session = admitted
        del admitted
        loop = asyncio.get_running_loop()
        trace = tracing.start_span("connection", worker_slot=self.worker_slot)
        conn: WsConnection | None = None
        outcome: Peer | CloseCode | None = None
        try:
            try:
                accept = check_upgrade(request.method, request.headers)
            except Refusal as r:
                response = self._refuse(r.error, r.detail)
                if isinstance(r, VersionRefused):
                    response.headers["Sec-WebSocket-Version"] = WS_VERSION
                return response
            conn = take_over(request, switching_protocols(accept),
                             self.config.max_message_bytes)
            if conn is None:  # the client went away during the upgrade
                return detached()
            self.handshaking.add(conn)
            with trace.child("handshake") as hello_trace:
                outcome = await self._hello(conn, claims, session, trace)
                hello_trace.set_attribute("outcome", "ok" if isinstance(outcome, Peer)
                                          else _close_name(outcome))
                if isinstance(outcome, Peer):
                    hello_trace.set_attribute("role", outcome.role)
            return detached()
        finally:
            if conn is not None:
                self.handshaking.discard(conn)
            self.handshakes -= 1  # a joined peer is counted in peers from now on
            self.registry.release(session, loop.time())
            del claims  # uncached claims would otherwise live as long as the connection
            if isinstance(outcome, Peer):
                trace.set_attribute("role", outcome.role)
                outcome.conn.attach(outcome)
            else:
                if conn is not None and not conn.lost and not conn.transport.is_closing():
                    conn.transport.abort()  # the hello ended by an error or a cancel
                if isinstance(outcome, CloseCode):
                    trace.set_attribute("close_code", int(outcome))
                    trace.set_attribute("close_reason", outcome.name)
                trace.end()

    def _refuse(self, error: ErrorCode, detail: str,
                retry_after_s: int | None = None) -> web.Response:
        self.stats.upgrades_refused[error.code] += 1
        log_event(log, "upgrade.refused", error=error.code, detail=detail)
        return error_response(error, detail, retry_after_s)

    async def _close_handshake(self, conn: WsConnection, code: CloseCode,
                               detail: str) -> CloseCode:
        self.stats.closes[code.name] += 1
        self.stats.handshake_refusals[code.name] += 1
        log_event(log, "hello.refused", code=int(code), reason=code.reason, detail=detail)
        await conn.close(code, self.config.close_timeout_s)
        return code

    async def _hello(self, conn: WsConnection, claims: TokenClaims, session: Any,
                     trace: tracing.OpenSpan) -> Peer | CloseCode | None:
        """Run the hello exchange: the joined :class:`Peer`, or the close code it was
        refused with (None if the client left first)."""
        try:
            first = await conn.first_message(self.config.handshake_timeout_s)
        except TimeoutError:
            return await self._close_handshake(conn, CloseCode.HANDSHAKE_TIMEOUT,
                                               "no hello in time")
        if first is None:
            return None
        if isinstance(first, ReadError):
            return await self._close_handshake(conn, first.close_code, first.detail)
        opcode, payload = first
        if opcode == OP_CLOSE:
            try:
                parse_close(payload)
            except ReadError as e:
                return await self._close_handshake(conn, e.close_code, e.detail)
            conn.close_received = True
            await conn.close(CloseCode.NORMAL, self.config.close_timeout_s)
            return None
        if opcode != OP_TEXT:
            return await self._close_handshake(conn, CloseCode.PROTOCOL_ERROR,
                                               "expected a text client_hello")
        try:
            hello = parse_client_hello(payload)
        except HelloError as e:
            return await self._close_handshake(conn, e.close_code, e.detail)
        del first, payload
        if hello.session_id != claims.sid:
            return await self._close_handshake(
                conn, CloseCode.SESSION_MISMATCH, "hello session_id differs from the token's sid")
        if self.verifier.expired(claims, time.time()):
            return await self._close_handshake(conn, CloseCode.TOKEN_EXPIRED,
                                               "token expired before the hello")
        if conn.lost:
            return None
        now = asyncio.get_running_loop().time()
        connection_id = f"{self._id_prefix}-{next(self._ids):x}"
        peer = Peer(self, conn, role=hello.role, peer_id=hello.peer_id,
                    connection_id=connection_id, session=session,
                    rate=self._new_rate_limit(now), now=now,
                    telemetry=CAP_TELEMETRY in claims.cap, trace=trace)
        try:
            joined = self.registry.join(session, hello.role, hello.peer_id, peer)
        except SessionFull:
            return await self._close_handshake(
                conn, CloseCode.SESSION_FULL,
                f"session has {self.config.max_participants} participants")
        peer.member = joined.member
        self.peers.add(peer)
        try:
            self._welcome(peer, hello.client_nonce, joined)
        except BaseException:
            peer.close(CloseCode.INTERNAL_ERROR, "evicted")
            raise
        return peer

    def _welcome(self, peer: Peer, client_nonce: str, joined: JoinResult[Peer]) -> None:
        """Tell a peer that just joined where it stands, and its counterparts about it."""
        session = peer.session
        now = asyncio.get_running_loop().time()
        if session.member_count == 1 and not joined.replaced:
            log_event(log, "session.joined", session_age_s=round(now - session.created_at, 3))
        self.stats.handshakes_ok += 1
        # No await from here to the end of the fan-out: the server hello is the first
        # message the peer gets, and events reach everyone in a consistent order.
        peer.write_text(encode_server_hello(
            ack_nonce=client_nonce, server_nonce=new_server_nonce(),
            heartbeat_s=self.config.heartbeat_s, connection_id=peer.connection_id,
            host_present=joined.host_present, participants=joined.participant_count))
        for replaced in joined.replaced:
            old = replaced.member.conn
            old.member = None  # already out of the session; no second peer_left
            left = encode_peer_left(old.role, old.peer_id, "replaced")
            for other in replaced.notify:
                other.write_text(left)
            old.close(CloseCode.REPLACED, "replaced")
        joined_event = encode_peer_joined(peer.role, peer.peer_id)
        for other in joined.notify:
            other.write_text(joined_event)
        for present in joined.present:
            peer.write_text(encode_peer_joined(present.role, present.peer_id))
        log_event(log, "hello.accepted", connection_id=peer.connection_id, role=peer.role,
                  replaced=len(joined.replaced))

    # --- the data plane: called by each peer's connection ----------------------------
    def on_message(self, peer: Peer, opcode: int, data: bytes) -> None:
        """Forward, answer or refuse one message of a joined ``peer``.

        Receivers get the frame now, in order, never through a queue; if any of them is
        over its high-water mark the sender's connection stops reading until they drain
        or are evicted (:meth:`_wait_for_receivers`).
        """
        stats = self.stats
        if opcode == OP_BINARY:
            sampling = peer.telemetry  # only opted-in peers feed the size/latency histograms
            if sampling:
                started = perf_counter()
            try:
                kind = check_frame(data)
            except FrameError as e:
                self._evict(peer, e.close_code, e.detail)
                return
            size = len(data)
            peer.rx_msgs += 1
            peer.rx_bytes += size
            if not peer.rate.allow(size, asyncio.get_running_loop().time()):
                stats.rate_limited += 1
                peer.close(CloseCode.RATE_LIMITED, "evicted")
                return
            if kind == _HEARTBEAT:
                peer.echo_heartbeat(data)
                stats.heartbeats_answered += 1
                self._answered(peer)
                return
            peer.data_msgs += 1
            receivers = (peer.session.participant_conns if peer.is_host
                         else peer.session.host_conns)
            if not receivers:
                stats.frames_unrouted += 1
                return
            # Header and payload go out in one writev, so the payload is never copied.
            frame = (binary_header(size), data)
            delivered = 0
            paused = False
            for receiver in receivers:
                if receiver.closing:
                    continue
                try:
                    receiver.transport.writelines(frame)
                except RuntimeError:  # its connection is gone; connection_lost closes it
                    continue
                receiver.tx_msgs += 1
                receiver.tx_bytes += size
                delivered += 1
                if receiver.conn.writing_paused:
                    paused = True
            stats.kind_messages[kind] += delivered
            stats.kind_bytes[kind] += size * delivered
            if sampling and not peer.rx_msgs & 63 and len(stats.samples) < 1024:
                stats.samples.append((size, perf_counter() - started))
            if delivered != len(receivers):
                stats.frames_to_closing += len(receivers) - delivered
            if paused:
                peer.conn.hold()
                self.spawn(self._wait_for_receivers(peer, receivers))
        elif opcode == OP_PING:
            peer.rx_msgs += 1
            peer.pong(data)
            self._answered(peer)
        elif opcode == OP_PONG:
            peer.rx_msgs += 1
        elif opcode == OP_CLOSE:
            try:
                parse_close(data)
            except ReadError as e:
                self._evict(peer, e.close_code, e.detail)
                return
            peer.conn.close_received = True
            peer.close(CloseCode.NORMAL, "closed")
        else:  # text after the hello
            peer.close(CloseCode.UNSUPPORTED_DATA, "evicted")

    def _answered(self, peer: Peer) -> None:
        """After answering ``peer`` itself: a peer that does not read its answers is not
        read either (until its buffer drains, or it is evicted as a slow consumer)."""
        if peer.conn.writing_paused and not peer.held:
            peer.conn.hold()
            self.spawn(self._wait_for_receivers(peer, (peer,)))

    def on_read_error(self, peer: Peer, error: ReadError) -> None:
        """The client broke the WebSocket framing: close it with the error's code."""
        self._evict(peer, error.close_code, error.detail)

    def on_internal_error(self, peer: Peer) -> None:
        """A bug while handling a message: log it and close that connection (1011)."""
        log.exception("relay.internal_error", extra={
            "fields": {"connection_id": peer.connection_id}})
        peer.close(CloseCode.INTERNAL_ERROR, "evicted")

    def _evict(self, peer: Peer, code: CloseCode, detail: str) -> None:
        log_event(log, "frame.refused", connection_id=peer.connection_id, detail=detail)
        peer.close(code, "evicted")

    def ended(self, peer: Peer) -> None:
        """Account for a connection that is closing: its log line and its span."""
        code = peer.close_code or CloseCode.NORMAL
        log_event(log, "connection.closed", connection_id=peer.connection_id,
                  code=int(code), role=peer.role, rx_msgs=peer.rx_msgs,
                  rx_bytes=peer.rx_bytes, tx_msgs=peer.tx_msgs, tx_bytes=peer.tx_bytes)
        trace, peer.trace = peer.trace, tracing.NOOP_SPAN
        trace.set_attribute("close_code", int(code))
        trace.set_attribute("close_reason", code.name)
        if peer.telemetry:  # traffic numbers only for opted-in peers
            trace.set_attribute("bytes_in", peer.rx_bytes)
            trace.set_attribute("bytes_out", peer.tx_bytes)
            trace.set_attribute("messages_in", peer.rx_msgs)
            trace.set_attribute("messages_out", peer.tx_msgs)
        trace.end()

    def abort_handshakes(self) -> None:
        """Drop the connections still in their hello (the worker is stopping)."""
        for conn in list(self.handshaking):
            conn.transport.abort()

    async def _wait_for_receivers(self, sender: Peer, receivers: tuple[Peer, ...]) -> None:
        """With the sender's reading held, wait until each paused receiver drains or is
        evicted; then let the sender's connection read again."""
        sender.held = True
        try:
            stats = self.stats
            slow_timeout = self.config.slow_consumer_timeout_s
            for receiver in receivers:
                if receiver.conn.writing_paused and not receiver.closing:
                    stats.flow_pauses += 1
                    if not await receiver.wait_writable(slow_timeout):
                        self.evict_slow_consumer(receiver)
        finally:
            sender.held = False
            if not sender.closing:
                sender.conn.release()

    def evict_slow_consumer(self, peer: Peer) -> None:
        """Close a receiver that stayed over its high-water mark past the deadline (4005)."""
        self.stats.slow_consumer_evictions += 1
        log_event(log, "peer.evicted", connection_id=peer.connection_id,
                  buffered=peer.write_buffer_size)
        peer.close(CloseCode.SLOW_CONSUMER, "evicted")
