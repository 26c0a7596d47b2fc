"""The fallback controller with real transports: aiortc on loopback, a real relay process.

:func:`rescue.client.session.open_session` is run for a host and a participant in one event
loop, their WebRTC signalling an in-process pair. Forced failures tamper with that signalling
(every message dropped: no answer; ICE candidates stripped: blocked ICE). The relay's
``/debug/stats`` counters say whether a peer ever reached it, and its control plane (token
API and kill switch) is the guardrail. The client's ``rescue.client`` log records are
captured as the JSON lines the client would write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from rescue.client.channel import Channel
from rescue.client.fallback import FallbackUnavailable
from rescue.client.grants import ControlPlaneTokens, Grant, StaticToken, TokenSource
from rescue.client.ladder import (
    ACTIVATED,
    CONSIDERED,
    Decision,
    LadderEvent,
    LadderPolicy,
    Reason,
)
from rescue.client.session import open_session
from rescue.client.transport import MessageChannel, TransportKind
from rescue.client.webrtc import Signalling, signalling_pair
from rescue.keys import SigningKey
from rescue.logs import JsonFormatter
from tests.support.controlplane import call
from tests.support.observe import admin_stats, free_port
from tests.support.relay import RelayProcess, start_relay
from tests.support.tamper import TamperingRelay, TamperPlan

PSK = b"fallback integration test psk 32"
SERVICE_KEY = "fallback-test-service-key"
ADMIN_KEY = "fallback-test-admin-key"
WAIT_S = 30.0
FAIL_TIMEOUT_S = 1.5  # what a forced-failure WebRTC attempt is given
MARKER = b"PLAINTEXT-MARKER-"  # must never appear in a frame the relay forwards

CANDIDATE = re.compile(r"^a=candidate:.*\r?\n", re.MULTILINE)
Failure = Literal["no_answer", "blocked_ice"]


def sid() -> str:
    return f"fb-{uuid.uuid4().hex[:12]}"


def ws_url(relay: RelayProcess) -> str:
    return f"ws://127.0.0.1:{relay.port}/ws"


def relay_settings(key_dir: Path, **extra: Any) -> dict[str, Any]:
    """A relay with its admin listener and its control plane (token API, kill switch)."""
    return {"admin_port": free_port(), "admin_key": ADMIN_KEY, "service_keys": SERVICE_KEY,
            "signing_keys": str(key_dir), "heartbeat_s": 1.0, **extra}


@pytest.fixture(scope="module")
def cp_relay(key_dir: Path, signing_key: SigningKey,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay with an admin listener and a control plane, shared by the module's tests
    that do not change its kill switch."""
    proc = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("state"),
                       **relay_settings(key_dir))
    yield proc
    proc.stop()


class Tampering:
    """A signalling end that drops every message it sends or strips its ICE candidates."""

    def __init__(self, inner: Signalling, failure: Failure) -> None:
        self.inner = inner
        self.failure = failure
        self.sent: list[str] = []

    async def send(self, message: dict[str, str]) -> None:
        self.sent.append(message["type"])
        if self.failure == "blocked_ice":
            await self.inner.send({**message, "sdp": CANDIDATE.sub("", message["sdp"])})

    async def receive(self) -> dict[str, str]:
        return await self.inner.receive()


class CountingTokens:
    """A token source that records every grant asked of the one it wraps."""

    def __init__(self, inner: TokenSource) -> None:
        self.inner = inner
        self.asked: list[bool] = []  # the ``fresh`` flag of each call

    async def grant(self, *, fresh: bool = False) -> Grant:
        self.asked.append(fresh)
        return await self.inner.grant(fresh=fresh)


class RecordingRelay(TamperingRelay):
    """A proxy in front of the relay that alters nothing and keeps every binary frame it
    forwards to a peer: what the relay (or anyone on the path) sees."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port, TamperPlan("flip", role="nobody", nth=1))
        self.frames: list[bytes] = []

    def _alter(self, data: bytes, role: str) -> list[bytes]:
        self.frames.append(data)
        return [data]


@pytest.fixture
def client_log() -> Iterator[list[dict[str, Any]]]:
    """The ``rescue.client`` log records (DEBUG and up) as parsed JSON lines."""
    lines: list[dict[str, Any]] = []
    formatter = JsonFormatter()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    logger = logging.getLogger("rescue.client")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def fallback_records(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["event"].startswith("transport.fallback.")]


async def relay_counts(http: aiohttp.ClientSession, relay: RelayProcess) -> tuple[int, Any]:
    """(handshakes completed, upgrades refused by error) since the relay started."""
    counters = (await admin_stats(http, relay, ADMIN_KEY))["counters"]
    return counters["handshakes_ok"], counters["upgrades_refused"]


async def open_both(session: str, policy: LadderPolicy, tokens: Callable[[], TokenSource],
                    *, failure: Failure | None, relay_url: str | None,
                    events: dict[str, list[LadderEvent]]) -> dict[str, MessageChannel]:
    """open_session for a host and a participant at once; ``events`` gets each one's."""
    ends = signalling_pair()
    sides: dict[str, Signalling] = {
        role: end if failure is None else Tampering(end, failure)
        for role, end in zip(("host", "participant"), ends, strict=True)}
    timeout_s = 10.0 if failure is None else FAIL_TIMEOUT_S

    async def one(role: Literal["host", "participant"]) -> MessageChannel:
        return await open_session(
            session_id=session, role=role, psk=PSK, signalling=sides[role], policy=policy,
            tokens=tokens(), relay_url=relay_url, on_event=events.setdefault(role, []).append,
            webrtc_timeout_s=timeout_s)

    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(one("host"), one("participant"), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for channel in opened:
            await channel.close()
        raise errors[0]
    host, participant = opened
    return {"host": host, "participant": participant}


async def close_all(channels: dict[str, MessageChannel]) -> None:
    await asyncio.gather(*(c.close() for c in channels.values()))


async def next_message(channel: MessageChannel) -> bytes:
    async with asyncio.timeout(WAIT_S):
        async for data in channel:
            return data
    raise AssertionError("the channel ended without a message")


# --- the primary works: the relay is never involved ---------------------------------------


async def test_working_webrtc_is_used_and_the_relay_never_sees_a_peer(
        cp_relay: RelayProcess, http: aiohttp.ClientSession,
        client_log: list[dict[str, Any]]) -> None:
    session = sid()
    before = await relay_counts(http, cp_relay)
    sources: list[CountingTokens] = []

    def tokens() -> TokenSource:
        sources.append(CountingTokens(StaticToken(cp_relay.mint(session))))
        return sources[-1]

    events: dict[str, list[LadderEvent]] = {}
    channels = await open_both(session, LadderPolicy(fallback_flag=True), tokens,
                               failure=None, relay_url=ws_url(cp_relay), events=events)
    try:
        assert {r: c.transport for r, c in channels.items()} == {
            "host": TransportKind.WEBRTC, "participant": TransportKind.WEBRTC}
        await channels["host"].send(b"down")
        await channels["participant"].send(b"up")
        assert await next_message(channels["participant"]) == b"down"
        assert await next_message(channels["host"]) == b"up"
    finally:
        await close_all(channels)
    # The ladder emits nothing when the first attempt works, and the guardrail is not asked.
    assert events == {"host": [], "participant": []}
    assert fallback_records(client_log) == []
    assert [s.asked for s in sources] == [[], []]
    assert await relay_counts(http, cp_relay) == before


# --- the primary fails: the fallback engages, through the relay, end-to-end encrypted -----


@pytest.mark.parametrize("failure", ["no_answer", "blocked_ice"])
async def test_forced_webrtc_failure_falls_back_to_the_relay_with_e2e_encryption(
        cp_relay: RelayProcess, http: aiohttp.ClientSession,
        client_log: list[dict[str, Any]], failure: Failure) -> None:
    session = sid()
    proxy = RecordingRelay(cp_relay.port)
    await proxy.start()
    before, _ = await relay_counts(http, cp_relay)
    # Blocked ICE fails one attempt fast on the host; retrying it on a shared signalling
    # pair would race the participant's slower failure, so that case makes one attempt.
    attempts = 2 if failure == "no_answer" else 1
    policy = LadderPolicy(primary_attempts=attempts, primary_backoff_s=0.05,
                          fallback_flag=True)
    events: dict[str, list[LadderEvent]] = {}
    try:
        channels = await open_both(session, policy,
                                   lambda: StaticToken(cp_relay.mint(session)),
                                   failure=failure, relay_url=proxy.url, events=events)
        try:
            host, part = channels["host"], channels["participant"]
            assert isinstance(host, Channel) and isinstance(part, Channel)
            assert host.transport is part.transport is TransportKind.WEBSOCKET_FALLBACK
            down = [MARKER + b"down %d " % i + bytes(1000) for i in range(20)]
            up = [MARKER + b"up %d " % i + bytes(500) for i in range(20)]
            for data in down:
                await host.send(data)
            for data in up:
                await part.send(data)
            async with asyncio.timeout(WAIT_S):
                got_down = [(await part.receive()).data for _ in down]
                got_up = [await host.receive() for _ in up]
            assert got_down == down
            assert [m.data for m in got_up] == up
            assert {m.peer_id for m in got_up} == {part.peer_id}
        finally:
            await close_all(channels)
    finally:
        await proxy.stop()
    # Both peers reached the relay; every frame it forwarded was sealed.
    after, _ = await relay_counts(http, cp_relay)
    assert after - before == 2
    assert len(proxy.frames) >= len(down) + len(up)
    assert not any(MARKER in frame for frame in proxy.frames)

    expected_reason = {"no_answer": {Reason.NO_ANSWER},
                       "blocked_ice": {Reason.ICE_FAILED, Reason.PRIMARY_TIMEOUT}}[failure]
    for role, seen in events.items():
        assert [(e.name, e.decision) for e in seen] == [
            (CONSIDERED, "activate"), (ACTIVATED, None)], role
        considered, activated = seen
        assert considered.reasons == activated.reasons
        assert considered.reasons[-1] is Reason.TURN_NOT_CONFIGURED
        assert set(considered.reasons[:-1]) <= expected_reason, (role, considered.reasons)
        assert len(considered.reasons) >= 2
        assert considered.attempts == activated.attempts == attempts
        assert considered.session_id == session

    # The same events, as JSON log lines, in order: every activation follows a consideration.
    records = fallback_records(client_log)
    names = [r["event"] for r in records]
    assert sorted(names) == sorted([CONSIDERED, ACTIVATED] * 2)
    assert names[0] == CONSIDERED and names[-1] == ACTIVATED
    assert all(names[:i].count(CONSIDERED) >= names[:i].count(ACTIVATED)
               for i in range(len(names) + 1))
    for record in records:
        assert record["session_id"] == session and record["attempts"] == attempts
        assert record["reasons"][-1] == "turn_not_configured"
        if record["event"] == CONSIDERED:
            assert (record["level"], record["decision"]) == ("info", "activate")
        else:
            assert record["level"] == "warning" and "decision" not in record


async def test_the_guardrails_grant_is_the_fallbacks_token(
        cp_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    """Through the control plane: its relay_url is used and it is asked once per peer."""
    session = sid()
    before, _ = await relay_counts(http, cp_relay)
    sources: list[CountingTokens] = []

    def tokens() -> TokenSource:
        sources.append(CountingTokens(ControlPlaneTokens(
            cp_relay.http_url(""), SERVICE_KEY, session, http=http)))
        return sources[-1]

    events: dict[str, list[LadderEvent]] = {}
    channels = await open_both(session, LadderPolicy(primary_attempts=1, fallback_flag=True),
                               tokens, failure="no_answer", relay_url=None, events=events)
    try:
        host, part = channels["host"], channels["participant"]
        assert host.transport is part.transport is TransportKind.WEBSOCKET_FALLBACK
        await host.send(b"over the control plane's relay_url")
        assert await next_message(part) == b"over the control plane's relay_url"
    finally:
        await close_all(channels)
    assert [s.asked for s in sources] == [[False], [False]]  # one grant each, no second mint
    assert (await relay_counts(http, cp_relay))[0] - before == 2
    assert [[e.name for e in seen] for seen in events.values()] == [
        [CONSIDERED, ACTIVATED]] * 2


# --- the fallback is declined: flag off, kill switch, guardrail refusals --------------------


async def open_host_alone(session: str, policy: LadderPolicy, tokens: TokenSource,
                          relay_url: str | None) -> tuple[FallbackUnavailable,
                                                          list[LadderEvent]]:
    """open_session for a host whose participant never answers; it must fail."""
    a, _ = signalling_pair()
    events: list[LadderEvent] = []
    with pytest.raises(FallbackUnavailable) as raised:
        async with asyncio.timeout(WAIT_S):
            await open_session(session_id=session, role="host", psk=PSK,
                               signalling=Tampering(a, "no_answer"), policy=policy,
                               tokens=tokens, relay_url=relay_url, on_event=events.append,
                               webrtc_timeout_s=0.5)
    return raised.value, events


async def test_flag_off_never_falls_back_nor_asks_the_guardrail(
        cp_relay: RelayProcess, http: aiohttp.ClientSession,
        client_log: list[dict[str, Any]]) -> None:
    session = sid()
    before = await relay_counts(http, cp_relay)
    tokens = CountingTokens(StaticToken(cp_relay.mint(session)))
    error, events = await open_host_alone(
        session, LadderPolicy(primary_attempts=1, fallback_flag=False), tokens,
        ws_url(cp_relay))
    reasons = (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED, Reason.FLAG_OFF)
    assert error.reasons == reasons
    assert events == [LadderEvent(CONSIDERED, session, reasons, 1, Decision.DECLINE)]
    assert tokens.asked == []
    assert await relay_counts(http, cp_relay) == before
    assert [(r["event"], r["decision"], r["reasons"]) for r in fallback_records(client_log)] \
        == [(CONSIDERED, "decline", ["no_answer", "turn_not_configured", "flag_off"])]


@pytest.mark.parametrize(("refusal", "reason"), [
    ("wrong_service_key", Reason.GUARDRAIL_DENIED),
    ("nothing_listening", Reason.GUARDRAIL_UNREACHABLE),
])
async def test_a_guardrail_refusal_declines_the_fallback(
        cp_relay: RelayProcess, http: aiohttp.ClientSession, refusal: str,
        reason: Reason) -> None:
    session = sid()
    before = await relay_counts(http, cp_relay)
    base = (cp_relay.http_url("") if refusal == "wrong_service_key"
            else f"http://127.0.0.1:{free_port()}")
    tokens = ControlPlaneTokens(base, "not-a-service-key", session, http=http)
    error, events = await open_host_alone(
        session, LadderPolicy(primary_attempts=1, fallback_flag=True), tokens, None)
    assert error.reasons == (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED, reason)
    assert [(e.name, e.decision) for e in events] == [(CONSIDERED, "decline")]
    assert await relay_counts(http, cp_relay) == before


async def test_the_control_planes_kill_switch_declines_the_fallback(
        relay_factory: Callable[..., RelayProcess], key_dir: Path,
        http: aiohttp.ClientSession, client_log: list[dict[str, Any]]) -> None:
    relay = relay_factory(**relay_settings(key_dir))
    status, _, body = await call(http, relay, "/admin/pause", {}, ADMIN_KEY)
    assert (status, body["paused"]) == (200, "soft")
    session = sid()
    before = await relay_counts(http, relay)
    tokens = ControlPlaneTokens(relay.http_url(""), SERVICE_KEY, session, http=http)
    error, events = await open_host_alone(
        session, LadderPolicy(primary_attempts=1, fallback_flag=True), tokens, None)
    reasons = (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED, Reason.PAUSED)
    assert error.reasons == reasons
    assert events == [LadderEvent(CONSIDERED, session, reasons, 1, Decision.DECLINE)]
    assert await relay_counts(http, relay) == before  # never even tried an upgrade
    assert [(r["event"], r["decision"]) for r in fallback_records(client_log)] == [
        (CONSIDERED, "decline")]


async def test_the_relays_own_pause_stops_an_allowed_fallback(
        relay_factory: Callable[..., RelayProcess], key_dir: Path,
        http: aiohttp.ClientSession, client_log: list[dict[str, Any]]) -> None:
    """A locally minted token passes the guardrail, but the relay is paused: ``paused``."""
    relay = relay_factory(**relay_settings(key_dir, fallback_paused=True))
    session = sid()
    error, events = await open_host_alone(
        session, LadderPolicy(primary_attempts=1, fallback_flag=True),
        StaticToken(relay.mint(session)), ws_url(relay))
    reasons = (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED, Reason.PAUSED)
    assert error.reasons == reasons
    # Considered and allowed, but never activated: the relay refused the upgrade.
    assert events == [LadderEvent(CONSIDERED, session, reasons[:2], 1, Decision.ACTIVATE)]
    handshakes, refused = await relay_counts(http, relay)
    assert (handshakes, refused) == (0, {"fallback_paused": 1})
    assert [r["event"] for r in fallback_records(client_log)] == [CONSIDERED]


async def test_a_fallback_with_no_relay_url_anywhere_fails_at_once(
        cp_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    session = sid()
    before = await relay_counts(http, cp_relay)
    error, events = await open_host_alone(
        session, LadderPolicy(primary_attempts=1, fallback_flag=True),
        StaticToken(cp_relay.mint(session)), None)  # neither the caller nor the grant
    assert error.reasons == (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED,
                             Reason.FALLBACK_FAILED)
    assert "no relay URL" in str(error.__cause__)
    assert [(e.name, e.decision) for e in events] == [(CONSIDERED, Decision.ACTIVATE)]
    assert await relay_counts(http, cp_relay) == before
