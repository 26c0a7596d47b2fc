"""``beach-rescue probe``: a synthetic end-to-end check of a relay, blackbox style.

One run gets a token (given, minted with a local key, or asked of the control plane),
joins a fresh session as a host and as a participant, relays data frames both ways and
checks each arrives byte-exact and in order, measures heartbeat round trips and one-way
latency, closes both connections with 1000 and returns a :class:`ProbeResult`. A failure
names its step (``token``, ``connect-host``, ``hello-host``, ``connect-participant``,
``hello-participant``, ``join``, ``relay``, ``heartbeat``, ``close``) and its class, the
exit code: 3 no token, 4 connection or HTTP refusal, 5 protocol or data failure,
6 timeout (1: an internal error, or the metrics file could not be written).

Frames go one at a time (send, then wait for that frame), so each one-way latency is a
clean measurement: host and participant share this process's monotonic clock. Results
print as text or JSON, and as Prometheus text: a file for node_exporter's textfile
collector or stdout for a Pushgateway (rescue/probe_report.py formats them). The token
and the service key travel in ``Authorization`` headers only and are scrubbed from every
reason.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import math
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import jwt
import msgspec
from prometheus_client import generate_latest
from yarl import URL

from rescue import __version__, hello, keys, tokens
from rescue.frames import HEADER_SIZE, FrameError, Kind, decode_frame, encode_frame
from rescue.probe_report import (
    ProbeResult,
    failure_line,
    format_summary,
    metrics_registry,
    report,
    write_metrics_file,
)

if TYPE_CHECKING:
    from rescue.config import Config

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_NO_TOKEN, EXIT_REFUSED, EXIT_PROTOCOL, EXIT_TIMEOUT = 3, 4, 5, 6
MAX_FRAMES: Final = 400
"""Each connection sends 2 x frames + 1 messages: below the relay's default burst of 1000."""
PROBE_COHORT: Final = "probe"
TOKEN_PATH: Final = "/v1/fallback/token"
TOKEN_TTL_S: Final = 60
USER_AGENT: Final = f"beach-rescue-probe/{__version__}"

_DATA = struct.Struct(">4sQI")  # marker, send time (monotonic ns), frame index
_MARKER = b"BRP1"
_STAMP = struct.Struct(">Q")  # heartbeat payload: send time (monotonic ns)
_MAX_ERROR_BODY = 8192


class ProbeFailure(Exception):
    """The probe stopped at ``step`` because of ``reason``; ``exit_code`` classifies it."""

    def __init__(self, step: str, reason: str, exit_code: int) -> None:
        super().__init__(f"probe failed at {step}: {reason}")
        self.step, self.reason, self.exit_code = step, reason, exit_code


@dataclass(frozen=True)
class TokenSource:
    """Where the token comes from: ``token``, else ``control_plane``, else ``key_dir``.

    The service key is ``service_key`` or the first line of ``service_key_file``.
    """

    token: str | None = None
    key_dir: Path | None = None
    kid: str | None = None
    control_plane: str | None = None
    service_key: str | None = None
    service_key_file: Path | None = None
    cohort: str = PROBE_COHORT
    audience: str = tokens.DEFAULT_AUDIENCE
    issuer: str = "beach-rescue-probe"


@dataclass(frozen=True)
class ProbeOptions:
    """One probe run: relay URL (None: the control plane's ``relay_url``) and limits."""

    url: str | None
    source: TokenSource
    session_id: str
    frames: int = 10
    timeout_s: float = 10.0


def check_server_hello(answer: hello.ServerHello, client_nonce: str) -> str | None:
    """Return what is wrong with ``answer`` as the reply to ``client_nonce``, or None."""
    try:
        server_nonce = base64.b64decode(answer.server_nonce, validate=True)
    except (binascii.Error, ValueError):
        server_nonce = b""
    problems = [
        (answer.protocol_version != 1, f"protocol_version {answer.protocol_version}, not 1"),
        (answer.ack_nonce != client_nonce, "ack_nonce does not echo the client_nonce"),
        (len(server_nonce) != 16, "server_nonce is not base64 of 16 bytes"),
        (answer.compression != "none", f"compression {answer.compression!r}, not 'none'"),
        (not answer.heartbeat_s > 0, f"heartbeat_s {answer.heartbeat_s} is not positive"),
        (not answer.connection_id, "connection_id is empty"),
    ]
    return next((problem for bad, problem in problems if bad), None)


def session_of_token(token: str) -> str | None:
    """Return the ``sid`` claim of ``token``, read without verifying it, or None."""
    try:
        sid = jwt.decode(token, options={"verify_signature": False}).get("sid")
    except jwt.PyJWTError:
        return None
    return sid if isinstance(sid, str) and hello.is_valid_session_id(sid) else None


def relay_target(url: str) -> URL:
    """Return the relay URL to connect to: no credentials, no ``token`` query parameter."""
    parsed = URL(url).with_user(None)
    return parsed.with_query({k: v for k, v in parsed.query.items() if k != "token"})


def _display(url: URL) -> str:
    return str(url.with_query(None).with_fragment(None))


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        cause = error.os_error  # asyncio's socket errors say "Connect call failed ..."
        plain = type(cause) is OSError or isinstance(cause, ConnectionError)
        why = os.strerror(cause.errno) if plain and cause.errno else cause.strerror or cause
        return f"cannot connect to {error.host}:{error.port}: {why}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _parse_event(text: str) -> hello.ServerMessage | None:
    """A relay text message, or None for one of an unknown type (clients ignore those)."""
    try:
        return hello.parse_server_message(text)
    except hello.HelloError:
        return None


def _mismatch(got: bytes, wanted: bytes, what: str) -> str:
    try:
        frame = decode_frame(got)
    except FrameError as e:
        return f"{what}: malformed frame ({e.detail})"
    if frame.kind is Kind.DATA and len(frame.payload) >= _DATA.size:
        marker, _, index = _DATA.unpack_from(frame.payload)
        if marker == _MARKER and index != _DATA.unpack_from(wanted, HEADER_SIZE)[2]:
            return f"{what}: out of order, frame {index} arrived instead"
    return (f"{what} arrived altered ({frame.kind.name.lower()} frame of {len(got)} bytes, "
            f"{len(wanted)} sent)")


class _RefusalBodies:
    """Keeps the ``error`` code of the last refused upgrade (aiohttp drops the body)."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(self._on_request_end)

    async def _on_request_end(self, _session: aiohttp.ClientSession, _ctx: Any,
                              params: aiohttp.TraceRequestEndParams) -> None:
        response = params.response
        if params.headers.get("Upgrade") != "websocket" or response.status == 101:
            return
        body = b""
        while len(body) < _MAX_ERROR_BODY:
            chunk = await response.content.read(_MAX_ERROR_BODY - len(body))
            if not chunk:
                break
            body += chunk
        try:
            error = msgspec.json.decode(body).get("error")
        except (msgspec.DecodeError, AttributeError):
            return
        self.last = error if isinstance(error, str) else None


@dataclass
class _Peer:
    role: hello.Role
    peer_id: str
    ws: aiohttp.ClientWebSocketResponse[Any]
    counterpart: str = ""
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _is(kind: type[hello.PeerJoined | hello.PeerLeft],
        peer_id: str) -> Callable[[hello.ServerMessage], bool]:
    return lambda event: isinstance(event, kind) and event.peer_id == peer_id


class _Run:
    """The steps of one run; each raises :class:`ProbeFailure` when it fails."""

    def __init__(self, http: aiohttp.ClientSession, url: URL, token: str, *,
                 options: ProbeOptions, result: ProbeResult, refusals: _RefusalBodies) -> None:
        self.http, self.token, self.options = http, token, options
        self.url = url.update_query(session=options.session_id)
        self.timeout = options.timeout_s
        self.result, self.refusals = result, refusals
        self.peers: list[_Peer] = []
        self.step = "connect-host"

    async def run(self) -> None:
        """Walk every step in order; return only when all of them passed."""
        host = await self._join("host")
        participant = await self._join("participant")
        host.counterpart, participant.counterpart = participant.peer_id, host.peer_id
        self.step = "join"
        await self._await_event(host, _is(hello.PeerJoined, participant.peer_id),
                                "peer_joined for the participant")
        await self._await_event(participant, _is(hello.PeerJoined, host.peer_id),
                                "peer_joined for the host")
        self.step = "relay"
        await self._relay(host, participant, self.result.host_to_participant_s)
        await self._relay(participant, host, self.result.participant_to_host_s)
        self.step = "heartbeat"
        for peer in (host, participant):
            await self._heartbeats(peer)
        self.step = "close"
        await self._close(participant)
        await self._await_event(host, _is(hello.PeerLeft, participant.peer_id),
                                "peer_left for the participant")
        await self._close(host)

    def _fail(self, reason: str, exit_code: int = EXIT_PROTOCOL) -> ProbeFailure:
        return ProbeFailure(self.step, reason, exit_code)

    async def _join(self, role: hello.Role) -> _Peer:
        self.step, self.refusals.last = f"connect-{role}", None
        try:
            async with asyncio.timeout(self.timeout):
                ws = await self.http.ws_connect(
                    self.url, headers={"Authorization": f"Bearer {self.token}"}, compress=0,
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout))
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 101:
                raise self._fail(f"bad upgrade answer: {e.message}") from None
            raise self._fail(f"{e.status} {self.refusals.last or 'without an error code'}",
                             EXIT_REFUSED) from None
        except TimeoutError:
            raise self._fail(f"no answer within {self.timeout:g}s", EXIT_TIMEOUT) from None
        except (aiohttp.ClientError, OSError) as e:
            raise self._fail(_describe(e), EXIT_REFUSED) from None
        peer = _Peer(role, f"probe-{role[:4]}-{secrets.token_hex(6)}", ws)
        self.peers.append(peer)
        self.step = f"hello-{role}"
        nonce = base64.b64encode(secrets.token_bytes(16)).decode("ascii")
        await self._send(peer, hello.encode_client_hello(hello.ClientHello(
            type="client_hello", session_id=self.options.session_id, role=role,
            protocol_version=hello.PROTOCOL_VERSION, client_nonce=nonce,
            compression=["none"], peer_id=peer.peer_id)))
        message = await self._receive(peer, "server_hello")
        answer = (_parse_event(message.data) if message.type is aiohttp.WSMsgType.TEXT
                  else None)
        if not isinstance(answer, hello.ServerHello):
            raise self._fail("the first message is not a valid server_hello")
        problem = check_server_hello(answer, nonce)
        if problem is None and role == "participant" and not answer.peers.host:
            problem = "it says no host is present"
        if problem is not None:
            raise self._fail(f"server_hello: {problem}")
        if role == "host":
            self.result.host_connection_id = answer.connection_id
        else:
            self.result.participant_connection_id = answer.connection_id
        return peer

    async def _send(self, peer: _Peer, data: str | bytes) -> None:
        try:
            if isinstance(data, str):
                await peer.ws.send_str(data)
            else:
                await peer.ws.send_bytes(data)
        except (aiohttp.ClientError, OSError, RuntimeError) as e:
            raise self._fail(f"{peer.role} could not send: {_describe(e)}") from None

    async def _receive(self, peer: _Peer, what: str) -> aiohttp.WSMessage:
        """The next text or binary message of ``peer``; failure on close, error or timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                message = await peer.ws.receive()
        except TimeoutError:
            raise self._fail(f"{what} not received within {self.timeout:g}s",
                             EXIT_TIMEOUT) from None
        if message.type is aiohttp.WSMsgType.CLOSE:
            raise self._fail(f"closed {message.data} {message.extra or ''}".rstrip())
        if message.type is aiohttp.WSMsgType.ERROR:
            raise self._fail(f"connection error: {_describe(message.data)}")
        if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            raise self._fail(f"connection lost ({peer.ws.close_code}) waiting for {what}")
        return message

    def _check_event(self, peer: _Peer, event: hello.ServerMessage | None) -> None:
        if isinstance(event, hello.PeerLeft) and event.peer_id == peer.counterpart:
            raise self._fail(f"the {event.role} left ({event.reason})")
        if isinstance(event, hello.Draining):
            raise self._fail(f"the relay is draining ({peer.role} told to reconnect after "
                             f"{event.reconnect_after_ms} ms)")

    async def _await_event(self, peer: _Peer, wanted: Callable[[hello.ServerMessage], bool],
                           what: str) -> None:
        while True:
            message = await self._receive(peer, f"{what} ({peer.role})")
            if message.type is aiohttp.WSMsgType.TEXT:
                event = _parse_event(message.data)
                if event is not None and wanted(event):
                    return
                self._check_event(peer, event)

    async def _next_frame(self, peer: _Peer, what: str) -> bytes:
        while True:
            message = await self._receive(peer, what)
            if message.type is aiohttp.WSMsgType.BINARY:
                return bytes(message.data)
            self._check_event(peer, _parse_event(message.data))

    async def _relay(self, sender: _Peer, receiver: _Peer, samples: list[float]) -> None:
        for index in range(1, self.options.frames + 1):
            payload = _DATA.pack(_MARKER, time.monotonic_ns(), index) + secrets.token_bytes(16)
            wire = encode_frame(Kind.DATA, sender.next_seq(), payload)
            await self._send(sender, wire)
            self.result.frames_sent += 1
            what = f"frame {index} ({sender.role}->{receiver.role})"
            got = await self._next_frame(receiver, what)
            while got[1:2] == bytes([Kind.HEARTBEAT]):  # not ours: echoes go to their sender
                got = await self._next_frame(receiver, what)
            arrived = time.monotonic_ns()
            if got != wire:
                raise self._fail(_mismatch(got, wire, what))
            samples.append((arrived - _DATA.unpack_from(wire, HEADER_SIZE)[1]) / 1e9)
            self.result.frames_received += 1

    async def _heartbeats(self, peer: _Peer) -> None:
        for index in range(1, self.options.frames + 1):
            payload = _STAMP.pack(time.monotonic_ns()) + secrets.token_bytes(8)
            wire = encode_frame(Kind.HEARTBEAT, peer.next_seq(), payload)
            await self._send(peer, wire)
            what = f"heartbeat {index} echo ({peer.role})"
            echo = await self._next_frame(peer, what)
            arrived = time.monotonic_ns()
            if echo != wire:
                raise self._fail(_mismatch(echo, wire, what))
            self.result.rtt_s.append((arrived - _STAMP.unpack_from(wire, HEADER_SIZE)[0]) / 1e9)

    async def _close(self, peer: _Peer) -> None:
        await peer.ws.close(code=1000)  # waits at most ws_close (the timeout) for the answer
        if peer.ws.close_code == 1000:
            return
        if isinstance(peer.ws.exception(), TimeoutError):
            raise self._fail(f"{peer.role}: the relay did not answer the close within "
                             f"{self.timeout:g}s", EXIT_TIMEOUT)
        raise self._fail(f"{peer.role}: the relay answered the close with "
                         f"{peer.ws.close_code}, not 1000")

    async def abort(self) -> None:
        """Close what is still open, giving each connection at most a second."""
        for peer in self.peers:
            if not peer.ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await peer.ws.close()


async def _obtain_token(http: aiohttp.ClientSession,
                        options: ProbeOptions) -> tuple[str, str | None]:
    """Return the token and the control plane's ``relay_url`` (None when not asked)."""
    source = options.source
    if source.token is not None:
        return source.token, None
    if source.control_plane is not None:
        return await _fetch_token(http, options, source.control_plane)
    try:
        key = keys.load_signing_key(source.key_dir or Path("."), source.kid)
        return tokens.mint_token(
            key, session_id=options.session_id, now=time.time(), ttl_s=TOKEN_TTL_S,
            cohort=source.cohort, issuer=source.issuer, audience=source.audience), None
    except (keys.KeyStoreError, ValueError) as e:
        raise ProbeFailure("token", str(e), EXIT_NO_TOKEN) from None


async def _fetch_token(http: aiohttp.ClientSession, options: ProbeOptions,
                       control_plane: str) -> tuple[str, str | None]:
    source = options.source

    def no_token(reason: str) -> ProbeFailure:
        return ProbeFailure("token", reason, EXIT_NO_TOKEN)

    service_key = source.service_key
    if not service_key and source.service_key_file is not None:
        try:
            service_key = source.service_key_file.read_text().partition("\n")[0].strip()
        except (OSError, UnicodeDecodeError) as e:
            raise no_token(f"cannot read service key file {source.service_key_file}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    if not service_key:
        raise no_token("no service key: pass --service-key or a non-empty --service-key-file")
    base = URL(control_plane)
    url = base if base.path.endswith(TOKEN_PATH) else base.with_path(
        base.path.rstrip("/") + TOKEN_PATH)
    body = {"session_id": options.session_id, "cohort_id": source.cohort,
            "client_version": USER_AGENT, "telemetry_opt_in": False}
    try:
        async with asyncio.timeout(options.timeout_s), http.post(
                url, json=body, headers={"Authorization": f"Bearer {service_key}"}) as response:
            raw, status = await response.read(), response.status
    except TimeoutError:
        raise no_token(f"the control plane did not answer within "
                       f"{options.timeout_s:g}s") from None
    except (aiohttp.ClientError, OSError) as e:
        raise no_token(f"control plane: {_describe(e)}") from None
    try:
        answer = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if status != 200:
        raise no_token(f"{status} {answer.get('error', 'refused')}")
    token, relay_url = answer.get("token"), answer.get("relay_url")
    if not isinstance(token, str) or not token:
        raise no_token("the control plane answered without a token")
    return token, relay_url if isinstance(relay_url, str) and relay_url else None


async def run_probe(options: ProbeOptions) -> ProbeResult:
    """Run one probe and return its result; a failure is reported in it, never raised."""
    started = time.monotonic()
    result = ProbeResult(target=_display(relay_target(options.url)) if options.url else "",
                         session_id=options.session_id, started_at=time.time())
    hidden = [options.source.token, options.source.service_key]
    refusals = _RefusalBodies()
    run: _Run | None = None
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT},
                                         trace_configs=[refusals.trace]) as http:
            try:
                token, relay_url = await _obtain_token(http, options)
                hidden.append(token)
                url = options.url or relay_url
                if url is None:
                    raise ProbeFailure("token", "the control plane sent no relay_url; "
                                       "pass --url", EXIT_NO_TOKEN)
                result.target = _display(relay_target(url))
                run = _Run(http, relay_target(url), token, options=options, result=result,
                           refusals=refusals)
                await run.run()
                result.ok = True
            finally:
                if run is not None:
                    await run.abort()
    except ProbeFailure as e:
        result.step, result.reason, result.exit_code = e.step, e.reason, e.exit_code
    except Exception as e:  # a bug or an unforeseen error: report it like a failure
        result.step = run.step if run is not None else "token"
        result.reason, result.exit_code = f"internal error: {_describe(e)}", EXIT_ERROR
    result.duration_s = time.monotonic() - started
    for secret in hidden:
        if secret and result.reason:
            result.reason = result.reason.replace(secret, "<redacted>")
    return result


def options_from_args(args: argparse.Namespace, config: Config) -> ProbeOptions:
    """Build the options of ``beach-rescue probe``; raises ``ValueError`` for bad usage."""
    if not 1 <= args.frames <= MAX_FRAMES:
        raise ValueError(f"--frames must be 1 to {MAX_FRAMES}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ValueError("--timeout must be a positive number of seconds")
    if args.url is None and args.control_plane is None:
        raise ValueError("--url is required unless --control-plane supplies the relay_url")
    if (args.service_key or args.service_key_file) and args.control_plane is None:
        raise ValueError("--service-key and --service-key-file go with --control-plane")
    session = args.session or (session_of_token(args.token) if args.token else None)
    session = session or f"probe-{secrets.token_hex(6)}"
    if not hello.is_valid_session_id(session):
        raise ValueError("--session must be 1-128 characters of A-Z a-z 0-9 . _ -")
    source = TokenSource(
        token=args.token, kid=args.kid, control_plane=args.control_plane,
        key_dir=Path(args.keys) if args.keys else config.resolved_state_dir() / "keys",
        service_key=args.service_key,
        service_key_file=Path(args.service_key_file) if args.service_key_file else None,
        cohort=args.cohort, audience=config.token_audience,
        issuer=config.token_issuer or "beach-rescue-probe")
    return ProbeOptions(url=args.url, source=source, session_id=session, frames=args.frames,
                        timeout_s=args.timeout)


def run_command(args: argparse.Namespace, config: Config) -> int:
    """Run ``beach-rescue probe`` from parsed arguments; return the exit status."""
    try:
        options = options_from_args(args, config)
    except ValueError as e:
        print(f"beach-rescue probe: {e}", file=sys.stderr)
        return EXIT_USAGE
    result = asyncio.run(run_probe(options))
    if args.json:
        print(msgspec.json.encode(report(result)).decode())
    elif args.push_text:
        sys.stdout.write(generate_latest(metrics_registry(result)).decode())
    elif result.ok:
        print(format_summary(result))
    if not result.ok:
        print(failure_line(result), file=sys.stderr)
    if args.metrics_file:
        try:
            write_metrics_file(result, Path(args.metrics_file))
        except OSError as e:
            print(f"beach-rescue probe: cannot write {args.metrics_file}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return result.exit_code or EXIT_ERROR
    return result.exit_code
