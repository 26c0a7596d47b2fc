"""The fallback controller: climbs the escalation ladder with real transports.

:func:`establish` drives a :class:`~rescue.client.ladder.Ladder`: it makes the primary
attempts (with the ladder's backoff between them), the TURN attempt when one is
configured, asks the guardrail, and opens the WebSocket fallback only when the ladder
says so. Each rung is a coroutine function the caller supplies, so the controller knows
no transport itself; :func:`rescue.client.webrtc.open_webrtc` fits the primary and TURN
rungs.

The ladder's events go to ``on_event`` and to the log (``transport.fallback.considered``
at INFO, ``transport.fallback.activated`` at WARNING so that a session running on the
fallback stands out); the returned channel's ``transport`` says which rung carries it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import assert_never

from rescue.client.errors import ChannelError, FallbackPaused, RelayRefused
from rescue.client.ladder import (
    ACTIVATED,
    ConsiderFallback,
    Established,
    FallbackResult,
    GiveUp,
    GuardrailAnswer,
    GuardrailResult,
    Ladder,
    LadderEvent,
    LadderPolicy,
    Outcome,
    PrimaryResult,
    Reason,
    TryPrimary,
    TryTurn,
    TurnResult,
    UseFallback,
)
from rescue.client.transport import MessageChannel
from rescue.client.webrtc import PrimaryFailed
from rescue.logs import log_event

__all__ = ["FallbackUnavailable", "GuardrailAnswer", "LadderPolicy", "establish"]

logger = logging.getLogger(__name__)

Rung = Callable[[], Awaitable[MessageChannel]]


class FallbackUnavailable(ChannelError):
    """Every rung failed or was declined; ``reasons`` lists why, in the order they arose."""

    def __init__(self, reasons: tuple[Reason, ...], attempts: int) -> None:
        super().__init__("no transport to the peer: " + ", ".join(reasons))
        self.reasons = reasons
        self.attempts = attempts


def _attempt_failure(error: BaseException) -> Reason | None:
    """The reason code for a failed primary/TURN attempt, None for an error to propagate."""
    if isinstance(error, PrimaryFailed):
        return error.reason
    if isinstance(error, TimeoutError):
        return Reason.PRIMARY_TIMEOUT
    if isinstance(error, (ChannelError, OSError)):
        return Reason.PRIMARY_ERROR
    return None


def _fallback_failure(error: BaseException) -> Reason | None:
    """The reason code for a failed fallback connection, None for an error to propagate."""
    if isinstance(error, FallbackPaused) or (
            isinstance(error, RelayRefused) and error.error == "fallback_paused"):
        return Reason.PAUSED
    if isinstance(error, (ChannelError, OSError, TimeoutError)):
        return Reason.FALLBACK_FAILED
    return None


async def _ask(guardrail: Callable[[], Awaitable[GuardrailAnswer]],
               session_id: str) -> GuardrailAnswer:
    try:
        return await guardrail()
    except Exception as e:  # a guardrail that cannot answer says no
        log_event(logger, "transport.guardrail.failed", logging.WARNING,
                  session_id=session_id, error=repr(e))
        return GuardrailAnswer.UNREACHABLE


async def establish(*, session_id: str, policy: LadderPolicy,
                    primary: Callable[[int], Awaitable[MessageChannel]],
                    turn: Rung | None,
                    fallback: Rung,
                    guardrail: Callable[[], Awaitable[GuardrailAnswer]],
                    on_event: Callable[[LadderEvent], None] | None = None,
                    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                    ) -> MessageChannel:
    """Return a channel to the peer from the lowest rung of the ladder that works.

    ``primary(attempt)`` makes primary attempt ``attempt`` (from 1), ``turn()`` the TURN
    attempt (required exactly when ``policy.turn_configured``), ``fallback()`` opens the
    WebSocket fallback and ``guardrail()`` asks the control plane whether it may (an
    exception counts as ``unreachable``). A rung fails by raising :class:`PrimaryFailed`
    (its reason is kept), TimeoutError, OSError or another ChannelError; any other
    exception propagates. ``sleep`` waits out the backoff. Raises
    :class:`FallbackUnavailable` when every rung failed or was declined.
    """
    if policy.turn_configured != (turn is not None):
        raise ValueError("pass turn exactly when policy.turn_configured is set")
    ladder = Ladder(policy, session_id)
    action = ladder.start()
    channel: MessageChannel | None = None
    last_error: BaseException | None = None
    while True:
        for event in ladder.events_to_emit():
            _emit(event, on_event)
        outcome: Outcome
        match action:
            case TryPrimary(attempt=attempt, delay_s=delay_s):
                if delay_s > 0:
                    await sleep(delay_s)
                channel, last_error, failure = await _try(lambda: primary(attempt),
                                                          _attempt_failure)
                _log_failure(session_id, f"primary#{attempt}", failure, last_error)
                outcome = PrimaryResult(attempt, failure)
            case TryTurn():
                assert turn is not None  # checked above
                channel, last_error, failure = await _try(turn, _attempt_failure)
                _log_failure(session_id, "turn", failure, last_error)
                outcome = TurnResult(failure)
            case ConsiderFallback():
                outcome = GuardrailResult(await _ask(guardrail, session_id))
            case UseFallback():
                channel, last_error, failure = await _try(fallback, _fallback_failure)
                _log_failure(session_id, "fallback", failure, last_error)
                outcome = FallbackResult(failure)
            case Established():
                assert channel is not None
                return channel
            case GiveUp(reasons=reasons):
                raise FallbackUnavailable(reasons, ladder.attempts) from last_error
            case _:  # pragma: no cover
                assert_never(action)
        action = ladder.handle(outcome)


async def _try(rung: Rung, classify: Callable[[BaseException], Reason | None],
               ) -> tuple[MessageChannel | None, BaseException | None, Reason | None]:
    """Run one rung: (channel, None, None) on success, (None, error, reason) on failure."""
    try:
        return await rung(), None, None
    except Exception as e:
        reason = classify(e)
        if reason is None:
            raise
        return None, e, reason


def _log_failure(session_id: str, rung: str, reason: Reason | None,
                 error: BaseException | None) -> None:
    if reason is not None:
        log_event(logger, "transport.attempt.failed", logging.DEBUG, session_id=session_id,
                  rung=rung, reason=str(reason), error=repr(error))


def _emit(event: LadderEvent, on_event: Callable[[LadderEvent], None] | None) -> None:
    level = logging.WARNING if event.name == ACTIVATED else logging.INFO
    log_event(logger, event.name, level, **event.fields())
    if on_event is not None:
        on_event(event)
