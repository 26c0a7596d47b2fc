"""The beach-rescue protocol v1 client of the Locust users: websocket-client under gevent.

A :class:`Session` is a host and a participant connection (:class:`Peer`) of one relay
session in the same process, each read by its own greenlet, so a data frame's trip host ->
relay -> participant is timed with one clock (its send time, ``time.monotonic_ns()``, is the
first 8 bytes of the payload). A :class:`Peer` connects, says hello, sends frames and
heartbeats, and reconnects after a drain, a drop or a storm. Everything is reported through a
:class:`Reporter` (``events.request.fire``); in Locust's statistics (CSV and HTML) the
request types and names are:

- ``hello`` host / participant: TCP connect + upgrade + client_hello -> server_hello;
- ``frame`` host->participant / participant->host: one frame's delivery through the relay;
- ``heartbeat`` rtt: a heartbeat frame -> the relay's answer;
- ``reconnect`` draining / storm / going_away / dropped: a reconnect's connect + hello,
  after its wait (``reconnect_after_ms``, storm jitter or backoff);
- ``connection`` host / participant: failures only, a connection closed or lost;
- ``token`` control-plane: ``POST /v1/fallback/token``.

The Locust users that run sessions are in load/beach_user.py; the :class:`ClientConfig`
(the relay's URL, the token source, the traffic settings) is built by load/locustfile.py.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import websocket
from locust.env import Environment
from shapes import TrafficSettings

from rescue.codes import CloseCode
from rescue.frames import MAX_SEQ, FrameError, Kind, decode_frame, encode_frame
from rescue.hello import (
    ClientHello,
    Draining,
    HelloError,
    Role,
    ServerHello,
    encode_client_hello,
    new_server_nonce,
    parse_server_message,
)

HELLO_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 1.0
TOKEN_REFRESH_MARGIN_S = 60
TERMINAL_CLOSES = frozenset({1000, 1003, 1005, 1009, 4000, 4002, 4003, 4004, 4008})
"""Closes after which a peer must not reconnect (a bug, a refusal, or replaced by itself)."""
TERMINAL_STATUSES = frozenset({400, 403, 404, 405, 426})


class HelloFailed(Exception):
    """A connect + hello did not succeed; ``terminal``: retrying cannot help."""

    def __init__(self, detail: str, *, retry_after: float | None = None,
                 terminal: bool = False) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.terminal = terminal


class ConnectionLost(Exception):
    """The relay closed a connection, or it broke, while the load generator wanted it."""


class Reporter:
    """Fires Locust request events: ``ok`` with a time in ms, ``fail`` with an exception."""

    def __init__(self, environment: Environment) -> None:
        self._fire = environment.events.request.fire

    def ok(self, kind: str, name: str, ms: float, length: int = 0) -> None:
        """Report one success."""
        self._fire(request_type=kind, name=name, response_time=ms, response_length=length,
                   exception=None, context={})

    def fail(self, kind: str, name: str, ms: float, exc: BaseException) -> None:
        """Report one failure (its message is grouped in Locust's failures table)."""
        self._fire(request_type=kind, name=name, response_time=ms, response_length=0,
                   exception=exc, context={})


def ms_since(start: float) -> float:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` value)."""
    return (time.perf_counter() - start) * 1000


TokenIssuer = Callable[[str, Reporter], tuple[str, float]]
"""Gives a token for a session id and its expiry (unix s), or raises HelloFailed."""


@dataclass(frozen=True)
class ClientConfig:
    """What every session of this process needs: the relay's URL, tokens, traffic."""

    url: str
    tokens: TokenIssuer
    traffic: TrafficSettings



def _close_code(data: bytes) -> tuple[int, str]:
    if len(data) < 2:
        return 1005, ""
    return struct.unpack(">H", data[:2])[0], data[2:].decode(errors="replace")


def _code_text(code: int) -> str:
    try:
        return f"{code} {CloseCode(code).reason}"
    except ValueError:
        return str(code)


def _stamp() -> bytes:
    return time.monotonic_ns().to_bytes(8, "big")


def _age_ms(payload: bytes) -> float | None:
    if len(payload) < 8:
        return None
    return (time.monotonic_ns() - int.from_bytes(payload[:8], "big")) / 1e6


class Peer:
    """One connection of a session (host or participant): hello, frames, and reconnecting.

    A greenlet reads it; on a ``draining`` event + 1012 it reconnects after
    ``reconnect_after_ms``, after other losses with backoff, never after a terminal close.
    """

    def __init__(self, session: Session, role: Role) -> None:
        self.session, self.role = session, role
        self.peer_id = f"{role[0]}-{secrets.token_urlsafe(9)}"
        self.ws: websocket.WebSocket | None = None
        self.heartbeat_s = 15.0
        self.gave_up = False
        self._seq = 0
        self._reconnect_after_ms: int | None = None
        self._drop: tuple[str, float] | None = None
        self._reader: gevent.Greenlet | None = None

    def connect(self) -> tuple[float, int]:
        """Open the WebSocket and complete the hello; return (ms, hello bytes) or raise
        :class:`HelloFailed`. The connection is not read until :meth:`start_reading`."""
        start = time.perf_counter()
        token = self.session.token()
        try:
            ws = websocket.create_connection(
                f"{self.session.config.url}?session={self.session.sid}",
                timeout=HELLO_TIMEOUT_S, header=[f"Authorization: Bearer {token}"],
                enable_multithread=True, skip_utf8_validation=True, suppress_origin=True)
        except websocket.WebSocketBadStatusException as e:
            raise self._refusal(e) from None
        except (websocket.WebSocketException, OSError) as e:
            raise HelloFailed(f"connect: {type(e).__name__}: {e}") from None
        try:
            nonce = new_server_nonce()
            ws.send(encode_client_hello(ClientHello(
                type="client_hello", session_id=self.session.sid, role=self.role,
                protocol_version=1, client_nonce=nonce, compression=["none"],
                peer_id=self.peer_id)))
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code, reason = _close_code(data)
                if code == CloseCode.TOKEN_EXPIRED:
                    self.session.forget_token()
                raise HelloFailed(f"closed {_code_text(code)} {reason}".rstrip(),
                                  terminal=code in TERMINAL_CLOSES)
            hello = parse_server_message(data) if opcode == websocket.ABNF.OPCODE_TEXT else None
            if not isinstance(hello, ServerHello) or hello.ack_nonce != nonce:
                raise HelloFailed("protocol: the first answer is not our server_hello",
                                  terminal=True)
        except (websocket.WebSocketException, OSError, HelloError, HelloFailed) as e:
            ws.shutdown()
            raise e if isinstance(e, HelloFailed) else HelloFailed(
                f"hello: {type(e).__name__}: {e}") from None
        self.heartbeat_s = self.session.config.traffic.heartbeat_s or float(hello.heartbeat_s)
        ws.settimeout(3 * self.heartbeat_s + 5)  # we heartbeat, so silence means a dead link
        self._seq, self._reconnect_after_ms, self._drop = 0, None, None
        self.ws = ws
        return ms_since(start), len(data)

    def _refusal(self, e: websocket.WebSocketBadStatusException) -> HelloFailed:
        error = "refused"
        with contextlib.suppress(ValueError, AttributeError):
            error = str(json.loads(e.resp_body or b"{}").get("error", error))
        if e.status_code == 401:
            self.session.forget_token()
        headers = e.resp_headers or {}
        retry = headers.get("retry-after")
        return HelloFailed(f"{e.status_code} {error}",
                           retry_after=float(retry) if retry and retry.isdigit() else None,
                           terminal=e.status_code in TERMINAL_STATUSES)

    def start_reading(self) -> None:
        """Start the greenlet that reads this connection and reconnects it."""
        self._reader = gevent.spawn(self._read_forever)

    def send(self, kind: Kind, payload: bytes) -> bool:
        """Send one frame if connected; return whether it was handed to the socket."""
        ws = self.ws
        if ws is None:
            return False
        frame = encode_frame(kind, self._seq, payload)
        self._seq = (self._seq + 1) & MAX_SEQ
        try:
            ws.send(frame, websocket.ABNF.OPCODE_BINARY)
        except (websocket.WebSocketException, OSError):
            ws.abort()  # the reader sees the loss and reconnects
            return False
        return True

    def drop(self, cause: str, reconnect_in_s: float) -> None:
        """Break the connection now and reconnect after ``reconnect_in_s`` (no-op while
        already reconnecting)."""
        ws = self.ws
        if ws is not None and self._drop is None:
            self._drop = (cause, reconnect_in_s)
            ws.abort()

    def close(self) -> None:
        """Close with 1000 and stop reading (waits up to ``CLOSE_WAIT_S`` for the reply)."""
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(websocket.WebSocketException, OSError):
                ws.send_close(1000)
        if self._reader is not None:
            self._reader.join(timeout=CLOSE_WAIT_S)
            self._reader.kill()
        for conn in (ws, self.ws):  # the reader may have reconnected meanwhile
            if conn is not None:
                conn.shutdown()
        self.ws = None

    def _read_forever(self) -> None:
        while not self.session.closing:
            cause, delay, lost = self._read_until_lost()
            self.ws = None
            if self.session.closing:
                return
            if lost is not None:
                self.session.report.fail("connection", self.role, 0, lost)
            self.gave_up = cause is None or not self._reconnect(cause, delay)
            if self.gave_up:
                return

    def _read_until_lost(self) -> tuple[str | None, float, ConnectionLost | None]:
        """Read until the connection ends; return (reconnect cause or None, delay, failure)."""
        ws = self.ws
        assert ws is not None
        try:
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    self.session.on_frame(self, data)
                elif opcode == websocket.ABNF.OPCODE_TEXT:
                    self._on_event(data)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        except (websocket.WebSocketException, OSError) as e:
            ws.shutdown()
            if self._drop is not None:
                return self._drop[0], self._drop[1], None
            return "dropped", _backoff(0), ConnectionLost(f"lost: {type(e).__name__}")
        ws.shutdown()
        code, _reason = _close_code(data)
        if code == CloseCode.SERVER_SHUTDOWN:
            after = self._reconnect_after_ms
            return "draining", (random.uniform(0, 1) if after is None else after / 1000), None
        if code == CloseCode.GOING_AWAY:
            return "going_away", _backoff(0), None
        lost = ConnectionLost(f"closed {_code_text(code)}")
        return (None if code in TERMINAL_CLOSES else "dropped"), _backoff(0), lost

    def _on_event(self, data: bytes) -> None:
        try:
            event = parse_server_message(data)
        except HelloError:
            return  # unknown event types are ignored, as the contract says
        if isinstance(event, Draining):
            self._reconnect_after_ms = event.reconnect_after_ms

    def _reconnect(self, cause: str, delay: float) -> bool:
        """Wait, reconnect (with backoff) until it works; False when giving up or closing."""
        attempt = 0
        while True:
            gevent.sleep(delay)
            if self.session.closing:
                return False
            start = time.perf_counter()
            try:
                ms, length = self.connect()
            except HelloFailed as e:
                self.session.report.fail("reconnect", cause, ms_since(start), e)
                if e.terminal:
                    return False
                attempt += 1
                delay = (e.retry_after + random.uniform(0, 1) if e.retry_after is not None
                         else _backoff(attempt))
                continue
            self.session.report.ok("reconnect", cause, ms, length)
            return True


def _backoff(attempt: int) -> float:
    """Jittered exponential backoff: 0.25-0.5 s, then doubling up to 2.5-5 s."""
    return min(5.0, 0.5 * 2.0 ** attempt) * random.uniform(0.5, 1.0)


class Session:
    """A host and a participant of one relay session, and what they send.

    Active sessions stream ``frame_bytes`` x ``frames_per_s`` host -> participant and
    ``input_bytes`` x ``inputs_per_s`` back; every connection heartbeats.
    """

    def __init__(self, config: ClientConfig, report: Reporter, active: bool) -> None:
        self.config, self.report, self.active = config, report, active
        self.sid = f"load-{secrets.token_urlsafe(12)}"
        self.host, self.participant = Peer(self, "host"), Peer(self, "participant")
        self.closing = self.opened = False
        self._token: tuple[str, float] | None = None
        traffic = config.traffic
        self._data = b"\0" * (traffic.frame_bytes - 8)
        self._input = b"\0" * (traffic.input_bytes - 8)
        self._next: dict[str, float] = {}

    def token(self) -> str:
        """The session's token, renewed when it has less than a minute left."""
        if self._token is None or self._token[1] - time.time() < TOKEN_REFRESH_MARGIN_S:
            self._token = self.config.tokens(self.sid, self.report)
        return self._token[0]

    def forget_token(self) -> None:
        """Get a new token before the next connect (the relay refused this one)."""
        self._token = None

    def open(self) -> HelloFailed | None:
        """Connect host then participant, reporting each ``hello``; None when both are in."""
        for peer in (self.host, self.participant):
            start = time.perf_counter()
            try:
                ms, length = peer.connect()
            except HelloFailed as e:
                self.report.fail("hello", peer.role, ms_since(start), e)
                self.close()
                return e
            self.report.ok("hello", peer.role, ms, length)
        self.opened = True
        now = time.monotonic()
        traffic = self.config.traffic
        self._next = {"host": now + random.uniform(0, self.host.heartbeat_s),
                      "participant": now + random.uniform(0, self.participant.heartbeat_s)}
        if self.active:
            self._next["data"] = now + random.uniform(0, 1 / traffic.frames_per_s)
            if traffic.inputs_per_s > 0:
                self._next["input"] = now + random.uniform(0, 1 / traffic.inputs_per_s)
        self.host.start_reading()
        self.participant.start_reading()
        return None

    @property
    def broken(self) -> bool:
        """Whether a peer gave up (a terminal close or refusal)."""
        return self.host.gave_up or self.participant.gave_up

    def seconds_until_due(self, now: float) -> float:
        """Seconds until the next frame is due (0 if one is due now)."""
        return max(0.0, min(self._next.values(), default=now + 1) - now)

    def send_due(self, now: float) -> None:
        """Send every frame that is due; a sender more than a second behind skips ahead."""
        traffic = self.config.traffic
        plan = (("data", self.host, Kind.DATA, self._data, 1 / traffic.frames_per_s),
                ("input", self.participant, Kind.DATA, self._input,
                 1 / traffic.inputs_per_s if traffic.inputs_per_s else 0),
                ("host", self.host, Kind.HEARTBEAT, b"", self.host.heartbeat_s),
                ("participant", self.participant, Kind.HEARTBEAT, b"",
                 self.participant.heartbeat_s))
        for slot, peer, kind, padding, interval in plan:
            due = self._next.get(slot)
            if due is None or due > now:
                continue
            peer.send(kind, _stamp() + padding)
            self._next[slot] = now + interval if now - due > 1 else due + interval

    def on_frame(self, peer: Peer, data: bytes) -> None:
        """Account for one binary message received by ``peer``."""
        try:
            frame = decode_frame(data)
        except FrameError as e:
            self.report.fail("frame", "malformed", 0, e)
            return
        age = _age_ms(frame.payload)
        if age is None:
            return
        if frame.kind == Kind.HEARTBEAT:
            self.report.ok("heartbeat", "rtt", age, len(data))
        elif frame.kind == Kind.DATA:
            name = "host->participant" if peer is self.participant else "participant->host"
            self.report.ok("frame", name, age, len(data))

    def close(self) -> None:
        """Close both connections (1000) and stop their greenlets."""
        self.closing = True
        for peer in (self.host, self.participant):
            peer.close()

