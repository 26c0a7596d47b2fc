"""Tests for rescue.client.fallback: the controller climbing the ladder with fake rungs.

Rungs are fake channels and scripted failures, the backoff sleep is recorded instead of
waited; one test wires real WebRTC (with its ICE candidates stripped) as the primary.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import pytest

from rescue.client.errors import FallbackPaused, RelayRefused
from rescue.client.fallback import FallbackUnavailable, establish
from rescue.client.ladder import (
    ACTIVATED,
    CONSIDERED,
    Decision,
    GuardrailAnswer,
    LadderEvent,
    LadderPolicy,
    Reason,
)
from rescue.client.transport import MessageChannel, TransportKind
from rescue.client.webrtc import PrimaryFailed, Signalling, open_webrtc, signalling_pair

SESSION = "sess-42"


class FakeChannel:
    """A MessageChannel that carries nothing; only its transport matters here."""

    def __init__(self, transport: TransportKind) -> None:
        self._transport = transport

    @property
    def transport(self) -> TransportKind:
        return self._transport

    async def send(self, data: bytes) -> None:
        raise AssertionError("not used")

    def __aiter__(self) -> AsyncIterator[bytes]:
        raise AssertionError("not used")

    async def close(self) -> None:
        return None


class Script:
    """Scripted rungs: each records its call; primary fails ``primary_failures`` times."""

    def __init__(self, *, primary_failures: int = 0, primary_error: BaseException | None = None,
                 turn_ok: bool = False, guardrail: GuardrailAnswer = GuardrailAnswer.ALLOWED,
                 guardrail_error: Exception | None = None,
                 fallback_error: Exception | None = None) -> None:
        self.primary_failures = primary_failures
        self.primary_error = primary_error or PrimaryFailed(Reason.ICE_FAILED, "scripted")
        self.turn_ok = turn_ok
        self.guardrail_answer = guardrail
        self.guardrail_error = guardrail_error
        self.fallback_error = fallback_error
        self.calls: list[str] = []
        self.sleeps: list[float] = []
        self.events: list[LadderEvent] = []

    async def primary(self, attempt: int) -> MessageChannel:
        self.calls.append(f"primary{attempt}")
        if attempt <= self.primary_failures:
            raise self.primary_error
        return FakeChannel(TransportKind.WEBRTC)

    async def turn(self) -> MessageChannel:
        self.calls.append("turn")
        if not self.turn_ok:
            raise PrimaryFailed(Reason.PRIMARY_TIMEOUT, "scripted")
        return FakeChannel(TransportKind.TURN)

    async def guardrail(self) -> GuardrailAnswer:
        self.calls.append("guardrail")
        if self.guardrail_error is not None:
            raise self.guardrail_error
        return self.guardrail_answer

    async def fallback(self) -> MessageChannel:
        self.calls.append("fallback")
        if self.fallback_error is not None:
            raise self.fallback_error
        return FakeChannel(TransportKind.WEBSOCKET_FALLBACK)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    async def run(self, policy: LadderPolicy) -> MessageChannel:
        return await establish(
            session_id=SESSION, policy=policy, primary=self.primary,
            turn=self.turn if policy.turn_configured else None, fallback=self.fallback,
            guardrail=self.guardrail, on_event=self.events.append, sleep=self.sleep)


def considered(decision: Decision, *reasons: Reason, attempts: int) -> LadderEvent:
    return LadderEvent(CONSIDERED, SESSION, reasons, attempts, decision)


async def test_working_primary_is_used_and_nothing_else_is_asked() -> None:
    script = Script()
    channel = await script.run(LadderPolicy(fallback_flag=True, turn_configured=True))
    assert channel.transport is TransportKind.WEBRTC
    assert script.calls == ["primary1"]
    assert script.sleeps == []
    assert script.events == []


async def test_primary_retries_back_off_and_a_late_success_needs_no_fallback() -> None:
    script = Script(primary_failures=2)
    channel = await script.run(LadderPolicy(primary_attempts=3, fallback_flag=True))
    assert channel.transport is TransportKind.WEBRTC
    assert script.calls == ["primary1", "primary2", "primary3"]
    assert script.sleeps == [0.5, 1.0]
    assert script.events == []


async def test_fallback_engages_only_after_every_primary_attempt_and_turn(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rescue.client.fallback")
    script = Script(primary_failures=3)
    policy = LadderPolicy(primary_attempts=3, turn_configured=True, fallback_flag=True)
    channel = await script.run(policy)
    assert channel.transport is TransportKind.WEBSOCKET_FALLBACK
    assert script.calls == ["primary1", "primary2", "primary3", "turn", "guardrail",
                            "fallback"]
    reasons = (Reason.ICE_FAILED, Reason.TURN_FAILED)
    assert script.events == [considered(Decision.ACTIVATE, *reasons, attempts=4),
                             LadderEvent(ACTIVATED, SESSION, reasons, 4)]
    logged = [(r.getMessage(), r.levelno, getattr(r, "fields", None)) for r in caplog.records
              if r.name == "rescue.client.fallback"]
    assert logged == [
        (CONSIDERED, logging.INFO, {"session_id": SESSION, "attempts": 4,
                                    "reasons": ["ice_failed", "turn_failed"],
                                    "decision": "activate"}),
        (ACTIVATED, logging.WARNING, {"session_id": SESSION, "attempts": 4,
                                      "reasons": ["ice_failed", "turn_failed"]}),
    ]


async def test_working_turn_is_used_before_any_fallback() -> None:
    script = Script(primary_failures=2, turn_ok=True)
    channel = await script.run(LadderPolicy(primary_attempts=2, turn_configured=True,
                                            fallback_flag=True))
    assert channel.transport is TransportKind.TURN
    assert "guardrail" not in script.calls and "fallback" not in script.calls
    assert script.events == []


async def test_flag_off_never_falls_back() -> None:
    script = Script(primary_failures=2)
    with pytest.raises(FallbackUnavailable) as raised:
        await script.run(LadderPolicy(primary_attempts=2, fallback_flag=False))
    reasons = (Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED, Reason.FLAG_OFF)
    assert raised.value.reasons == reasons
    assert raised.value.attempts == 2
    assert isinstance(raised.value.__cause__, PrimaryFailed)
    assert script.calls == ["primary1", "primary2"]  # no guardrail, no fallback
    assert script.events == [considered(Decision.DECLINE, *reasons, attempts=2)]


@pytest.mark.parametrize(("answer", "reason"), [
    (GuardrailAnswer.PAUSED, Reason.PAUSED),
    (GuardrailAnswer.DENIED, Reason.GUARDRAIL_DENIED),
    (GuardrailAnswer.UNREACHABLE, Reason.GUARDRAIL_UNREACHABLE),
])
async def test_guardrail_refusal_never_falls_back(answer: GuardrailAnswer,
                                                  reason: Reason) -> None:
    script = Script(primary_failures=1, guardrail=answer)
    with pytest.raises(FallbackUnavailable) as raised:
        await script.run(LadderPolicy(primary_attempts=1, fallback_flag=True))
    reasons = (Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED, reason)
    assert raised.value.reasons == reasons
    assert script.calls == ["primary1", "guardrail"]
    assert script.events == [considered(Decision.DECLINE, *reasons, attempts=1)]


async def test_a_guardrail_that_fails_counts_as_unreachable() -> None:
    script = Script(primary_failures=1, guardrail_error=OSError("control plane down"))
    with pytest.raises(FallbackUnavailable) as raised:
        await script.run(LadderPolicy(primary_attempts=1, fallback_flag=True))
    assert raised.value.reasons[-1] is Reason.GUARDRAIL_UNREACHABLE
    assert "fallback" not in script.calls


@pytest.mark.parametrize(("error", "reason"), [
    (FallbackPaused(4008, "GUARDRAIL_TRIPPED"), Reason.PAUSED),
    (RelayRefused(403, "fallback_paused", "paused by the operator"), Reason.PAUSED),
    (RelayRefused(503, "overloaded", "busy", 1.0), Reason.FALLBACK_FAILED),
    (ConnectionRefusedError("no relay"), Reason.FALLBACK_FAILED),
])
async def test_a_fallback_that_cannot_connect_gives_up(error: Exception,
                                                       reason: Reason) -> None:
    script = Script(primary_failures=1, fallback_error=error)
    with pytest.raises(FallbackUnavailable) as raised:
        await script.run(LadderPolicy(primary_attempts=1, fallback_flag=True))
    assert raised.value.reasons[-1] is reason
    assert raised.value.__cause__ is error
    assert [e.name for e in script.events] == [CONSIDERED]  # considered, never activated


@pytest.mark.parametrize(("error", "reason"), [
    (TimeoutError(), Reason.PRIMARY_TIMEOUT),
    (OSError("network unreachable"), Reason.PRIMARY_ERROR),
    (PrimaryFailed(Reason.NO_ANSWER, "scripted"), Reason.NO_ANSWER),
])
async def test_primary_errors_become_reason_codes(error: Exception, reason: Reason) -> None:
    script = Script(primary_failures=1, primary_error=error, guardrail=GuardrailAnswer.DENIED)
    with pytest.raises(FallbackUnavailable) as raised:
        await script.run(LadderPolicy(primary_attempts=1, fallback_flag=True))
    assert raised.value.reasons[0] is reason


async def test_a_bug_in_a_rung_is_not_mistaken_for_a_transport_failure() -> None:
    script = Script(primary_failures=1, primary_error=KeyError("bug"))
    with pytest.raises(KeyError):
        await script.run(LadderPolicy(primary_attempts=3, fallback_flag=True))
    assert script.calls == ["primary1"]


async def test_turn_must_match_the_policy() -> None:
    script = Script()
    with pytest.raises(ValueError, match="turn"):
        await establish(session_id=SESSION, policy=LadderPolicy(turn_configured=True),
                        primary=script.primary, turn=None, fallback=script.fallback,
                        guardrail=script.guardrail)
    with pytest.raises(ValueError, match="turn"):
        await establish(session_id=SESSION, policy=LadderPolicy(), primary=script.primary,
                        turn=script.turn, fallback=script.fallback,
                        guardrail=script.guardrail)
    assert script.calls == []


CANDIDATE = re.compile(r"^a=candidate:.*\r?\n", re.MULTILINE)


class StrippingSignalling:
    """Passes descriptions on without their ICE candidates, so no connectivity check works."""

    def __init__(self, inner: Signalling) -> None:
        self.inner = inner

    async def send(self, message: dict[str, str]) -> None:
        await self.inner.send({**message, "sdp": CANDIDATE.sub("", message["sdp"])})

    async def receive(self) -> dict[str, str]:
        return await self.inner.receive()


async def test_real_webrtc_with_blocked_ice_falls_back() -> None:
    """Each primary attempt is a real aiortc host against a real participant, ICE blocked."""
    script = Script()
    participants: list[asyncio.Task[object]] = []

    async def primary(attempt: int) -> MessageChannel:
        script.calls.append(f"primary{attempt}")
        a, b = signalling_pair()
        participant = asyncio.create_task(open_webrtc(
            "participant", StrippingSignalling(b), timeout_s=5.0))
        participants.append(participant)
        try:
            return await open_webrtc("host", StrippingSignalling(a),
                                     timeout_s=5.0)
        finally:
            participant.cancel()
            await asyncio.gather(participant, return_exceptions=True)

    channel = await asyncio.wait_for(establish(
        session_id=SESSION, policy=LadderPolicy(primary_attempts=2, fallback_flag=True),
        primary=primary, turn=None, fallback=script.fallback, guardrail=script.guardrail,
        on_event=script.events.append, sleep=script.sleep), 30)
    assert channel.transport is TransportKind.WEBSOCKET_FALLBACK
    assert script.calls == ["primary1", "primary2", "guardrail", "fallback"]
    assert script.sleeps == [0.5]
    reasons = (Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED)
    assert script.events == [considered(Decision.ACTIVATE, *reasons, attempts=2),
                             LadderEvent(ACTIVATED, SESSION, reasons, 2)]
    assert all(task.done() for task in participants)
