"""Tests for rescue.client.ladder: the escalation ladder's transitions, events and backoff."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.client.ladder import (
    ACTIVATED,
    CONSIDERED,
    Action,
    ConsiderFallback,
    Decision,
    Established,
    FallbackResult,
    GiveUp,
    GuardrailAnswer,
    GuardrailResult,
    Ladder,
    LadderError,
    LadderEvent,
    LadderPolicy,
    LadderState,
    PrimaryResult,
    Reason,
    TryPrimary,
    TryTurn,
    TurnResult,
    UseFallback,
)
from rescue.client.transport import TransportKind


def fail_primary(ladder: Ladder, first: Action, reason: Reason = Reason.ICE_FAILED,
                 ) -> tuple[list[TryPrimary], Action]:
    """Fail every primary attempt from ``first`` on; the attempts made and the next action."""
    tries: list[TryPrimary] = []
    action = first
    while isinstance(action, TryPrimary):
        tries.append(action)
        action = ladder.handle(PrimaryResult(action.attempt, reason))
    return tries, action


def test_primary_success_on_first_attempt_needs_nothing_else() -> None:
    ladder = Ladder(LadderPolicy(fallback_flag=True, turn_configured=True), "s1")
    assert ladder.start() == TryPrimary(1, 0.0)
    assert ladder.handle(PrimaryResult(1)) == Established(TransportKind.WEBRTC)
    assert ladder.state is LadderState.ESTABLISHED
    assert ladder.events_to_emit() == []
    assert ladder.attempts == 1


def test_primary_success_after_failures_considers_no_fallback() -> None:
    ladder = Ladder(LadderPolicy(fallback_flag=True), "s1")
    ladder.start()
    assert ladder.handle(PrimaryResult(1, Reason.NO_ANSWER)) == TryPrimary(2, 0.5)
    assert ladder.handle(PrimaryResult(2, Reason.ICE_FAILED)) == TryPrimary(3, 1.0)
    assert ladder.handle(PrimaryResult(3)) == Established(TransportKind.WEBRTC)
    assert ladder.events_to_emit() == []
    assert ladder.reasons == (Reason.NO_ANSWER, Reason.ICE_FAILED)


def test_all_primary_failures_without_turn_go_to_the_guardrail() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=3, fallback_flag=True), "s1")
    tries, action = fail_primary(ladder, ladder.start())
    assert [t.attempt for t in tries] == [1, 2, 3]
    assert action == ConsiderFallback((Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED))
    assert ladder.state is LadderState.GUARDRAIL
    assert ladder.events_to_emit() == []  # nothing decided yet


def test_turn_is_tried_after_the_primary_and_can_succeed() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=2, turn_configured=True), "s1")
    _, action = fail_primary(ladder, ladder.start(), Reason.PRIMARY_TIMEOUT)
    assert action == TryTurn()
    assert ladder.handle(TurnResult()) == Established(TransportKind.TURN)
    assert ladder.attempts == 3
    assert ladder.events_to_emit() == []


def test_turn_failure_escalates_with_turn_failed() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=1, turn_configured=True,
                                 fallback_flag=True), "s1")
    _, action = fail_primary(ladder, ladder.start())
    assert action == TryTurn()
    action = ladder.handle(TurnResult(Reason.ICE_FAILED))
    assert action == ConsiderFallback((Reason.ICE_FAILED, Reason.TURN_FAILED))


def test_flag_off_declines_without_asking_the_guardrail() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=2, fallback_flag=False), "sid-9")
    _, action = fail_primary(ladder, ladder.start(), Reason.NO_ANSWER)
    reasons = (Reason.NO_ANSWER, Reason.TURN_NOT_CONFIGURED, Reason.FLAG_OFF)
    assert action == GiveUp(reasons)
    assert ladder.state is LadderState.GAVE_UP
    assert ladder.events_to_emit() == [
        LadderEvent(CONSIDERED, "sid-9", reasons, 2, Decision.DECLINE)]


@pytest.mark.parametrize(("answer", "reason"), [
    (GuardrailAnswer.PAUSED, Reason.PAUSED),
    (GuardrailAnswer.DENIED, Reason.GUARDRAIL_DENIED),
    (GuardrailAnswer.UNREACHABLE, Reason.GUARDRAIL_UNREACHABLE),
])
def test_guardrail_refusals_give_up(answer: GuardrailAnswer, reason: Reason) -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=1, fallback_flag=True), "s1")
    fail_primary(ladder, ladder.start())
    reasons = (Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED, reason)
    assert ladder.handle(GuardrailResult(answer)) == GiveUp(reasons)
    assert ladder.events_to_emit() == [
        LadderEvent(CONSIDERED, "s1", reasons, 1, Decision.DECLINE)]


def test_allowed_fallback_is_considered_then_activated() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=2, fallback_flag=True), "s1")
    fail_primary(ladder, ladder.start())
    assert ladder.handle(GuardrailResult(GuardrailAnswer.ALLOWED)) == UseFallback()
    reasons = (Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED)
    assert ladder.events_to_emit() == [
        LadderEvent(CONSIDERED, "s1", reasons, 2, Decision.ACTIVATE)]
    assert ladder.handle(FallbackResult()) == Established(TransportKind.WEBSOCKET_FALLBACK)
    assert ladder.events_to_emit() == [LadderEvent(ACTIVATED, "s1", reasons, 2)]
    assert ladder.events_to_emit() == []  # taken once


def test_failed_fallback_gives_up_with_its_reason() -> None:
    ladder = Ladder(LadderPolicy(primary_attempts=1, fallback_flag=True), "s1")
    fail_primary(ladder, ladder.start())
    ladder.handle(GuardrailResult(GuardrailAnswer.ALLOWED))
    action = ladder.handle(FallbackResult(Reason.PAUSED))
    assert action == GiveUp((Reason.ICE_FAILED, Reason.TURN_NOT_CONFIGURED, Reason.PAUSED))
    names = [e.name for e in ladder.events_to_emit()]
    assert names == [CONSIDERED]  # never activated


def test_unexpected_outcomes_are_refused() -> None:
    ladder = Ladder(LadderPolicy(turn_configured=True), "s1")
    with pytest.raises(LadderError):
        ladder.handle(PrimaryResult(1))  # not started
    ladder.start()
    with pytest.raises(LadderError):
        ladder.start()
    with pytest.raises(LadderError):
        ladder.handle(TurnResult())  # waiting for the primary
    with pytest.raises(LadderError):
        ladder.handle(PrimaryResult(2, Reason.ICE_FAILED))  # attempt 1 is in progress
    assert ladder.handle(PrimaryResult(1)) == Established(TransportKind.WEBRTC)
    with pytest.raises(LadderError):
        ladder.handle(PrimaryResult(2))  # finished


def test_event_fields_are_json_friendly() -> None:
    event = LadderEvent(CONSIDERED, "s1", (Reason.ICE_FAILED, Reason.FLAG_OFF), 3,
                        Decision.DECLINE)
    assert event.fields() == {"session_id": "s1", "reasons": ["ice_failed", "flag_off"],
                              "attempts": 3, "decision": "decline"}
    assert "decision" not in LadderEvent(ACTIVATED, "s1", (), 1).fields()


@pytest.mark.parametrize("kwargs", [
    {"primary_attempts": 0}, {"primary_backoff_s": -1.0},
    {"primary_backoff_s": 2.0, "primary_backoff_cap_s": 1.0},
])
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LadderPolicy(**kwargs)  # type: ignore[arg-type]


policies = st.builds(
    LadderPolicy,
    primary_attempts=st.integers(1, 40),
    primary_backoff_s=st.floats(0.0, 10.0),
    primary_backoff_cap_s=st.floats(10.0, 120.0),
    turn_configured=st.booleans(),
    fallback_flag=st.booleans(),
)


@given(policies, st.lists(st.sampled_from([Reason.ICE_FAILED, Reason.NO_ANSWER,
                                            Reason.PRIMARY_TIMEOUT]), min_size=40))
def test_backoff_is_exponential_capped_and_attempts_are_counted(
        policy: LadderPolicy, failures: list[Reason]) -> None:
    ladder = Ladder(policy, "s")
    action = ladder.start()
    delays: list[float] = []
    while isinstance(action, TryPrimary):
        assert action.attempt == len(delays) + 1
        delays.append(action.delay_s)
        action = ladder.handle(PrimaryResult(action.attempt, failures[action.attempt - 1]))
    assert len(delays) == policy.primary_attempts == ladder.attempts
    assert delays[0] == 0.0
    base, cap = policy.primary_backoff_s, policy.primary_backoff_cap_s
    for k, delay in enumerate(delays[1:], start=2):
        assert 0.0 <= delay <= cap
        assert delay == min(cap, base * 2 ** (k - 2))
    assert delays == sorted(delays)  # never shrinks
    for prev, nxt in itertools.pairwise(delays[1:]):
        assert nxt == cap or nxt == pytest.approx(2 * prev)
    # Exhausting the primary leads to TURN exactly when configured.
    assert isinstance(action, TryTurn) == policy.turn_configured
    # Reasons never repeat and keep first-seen order.
    seen = list(dict.fromkeys(failures[:policy.primary_attempts]))
    assert list(ladder.reasons[:len(seen)]) == seen


@given(st.floats(0.0, 5.0), st.floats(5.0, 60.0), st.integers(2, 10_000))
def test_backoff_never_exceeds_the_cap_even_for_huge_attempt_numbers(
        base: float, cap: float, attempt: int) -> None:
    policy = LadderPolicy(primary_attempts=attempt, primary_backoff_s=base,
                          primary_backoff_cap_s=cap)
    delay = policy.backoff_before(attempt)
    assert 0.0 <= delay <= cap
    if base >= 1e-3 and attempt > 40:  # 1e-3 * 2**38 is far over any cap here
        assert delay == cap
