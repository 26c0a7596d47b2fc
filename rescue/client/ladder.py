"""The escalation ladder: which transport a peer tries next, as a sans-I/O state machine.

A Beach peer normally reaches the other side over a WebRTC data channel. When that does
not work, it climbs a ladder of ever more expensive transports::

    NEW ──start()──▶ PRIMARY ──fail (attempt < N)──▶ PRIMARY   (after a backoff delay)
                       │  └──fail (attempt = N)──▶ TURN, if configured, else ESCALATE
                       └──ok──▶ ESTABLISHED
    TURN ──ok──▶ ESTABLISHED      TURN ──fail──▶ ESCALATE
    ESCALATE: feature flag off ──▶ GAVE_UP  (considered, decision "decline", flag_off)
              flag on          ──▶ GUARDRAIL (the caller asks the control plane)
    GUARDRAIL ──allowed──▶ FALLBACK   (considered, decision "activate")
              └─paused / denied / unreachable──▶ GAVE_UP (considered, decision "decline")
    FALLBACK ──ok──▶ ESTABLISHED (activated)      FALLBACK ──fail──▶ GAVE_UP

:class:`Ladder` does no I/O and never sleeps. The caller feeds it *outcomes*
(:class:`PrimaryResult`, :class:`TurnResult`, :class:`GuardrailResult`,
:class:`FallbackResult`) and gets back the next *action* (:class:`TryPrimary`,
:class:`TryTurn`, :class:`ConsiderFallback`, :class:`UseFallback`, :class:`Established`,
:class:`GiveUp`); telemetry records (:class:`LadderEvent`) pile up until the caller takes
them with :meth:`Ladder.events_to_emit`. Which outcome each state accepts is a table
(``_EXPECTED``), so a caller that reports the wrong thing (a TURN result while the ladder
waits for a primary attempt, an attempt number that is not the current one) gets a
:class:`LadderError` instead of a silently confused ladder.

Every failure and every reason to decline adds a :class:`Reason` code; the codes travel,
in first-seen order and without repeats, in the events and in :class:`GiveUp`. The
WebSocket fallback is the last resort: it is considered only after every attempt below it
failed, and used only if the feature flag is on and the guardrail (whose ``paused`` answer
is the operator's kill switch) allows it. A guardrail that cannot be reached means *no*.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import assert_never

from rescue.client.transport import TransportKind

__all__ = [
    "ACTIVATED",
    "CONSIDERED",
    "Action",
    "ConsiderFallback",
    "Decision",
    "Established",
    "FallbackResult",
    "GiveUp",
    "GuardrailAnswer",
    "GuardrailResult",
    "Ladder",
    "LadderError",
    "LadderEvent",
    "LadderPolicy",
    "LadderState",
    "Outcome",
    "PrimaryResult",
    "Reason",
    "TryPrimary",
    "TryTurn",
    "TurnResult",
    "UseFallback",
]

#: Name of the event recorded when the ladder decides whether to use the fallback.
CONSIDERED = "transport.fallback.considered"
#: Name of the event recorded when the WebSocket fallback channel is established.
ACTIVATED = "transport.fallback.activated"


class Reason(enum.StrEnum):
    """Why a rung failed or why the fallback was declined (a stable code for logs and metrics)."""

    # A primary (or TURN) attempt failed.
    PRIMARY_TIMEOUT = "primary_timeout"      # no connection within the attempt's time limit
    ICE_FAILED = "ice_failed"                # ICE connectivity checks failed
    NO_ANSWER = "no_answer"                  # the other peer never answered on signalling
    SIGNALLING_FAILED = "signalling_failed"  # signalling broke or carried a bad description
    CONNECTION_FAILED = "connection_failed"  # DTLS/SCTP failed or closed after ICE
    PRIMARY_ERROR = "primary_error"          # any other transport error (OSError, ...)
    # The TURN rung.
    TURN_FAILED = "turn_failed"
    TURN_NOT_CONFIGURED = "turn_not_configured"
    # Why the WebSocket fallback was not used.
    FLAG_OFF = "flag_off"
    PAUSED = "paused"                        # the operator's kill switch
    GUARDRAIL_DENIED = "guardrail_denied"
    GUARDRAIL_UNREACHABLE = "guardrail_unreachable"
    FALLBACK_FAILED = "fallback_failed"      # the fallback itself could not connect


class GuardrailAnswer(enum.Enum):
    """The control plane's word on using the WebSocket fallback for this session now."""

    ALLOWED = "allowed"
    PAUSED = "paused"            # kill switch on (403 fallback_paused)
    DENIED = "denied"            # refused for another reason (not entitled, ...)
    UNREACHABLE = "unreachable"  # no answer: treated as a refusal


_DECLINE_REASON: dict[GuardrailAnswer, Reason] = {
    GuardrailAnswer.PAUSED: Reason.PAUSED,
    GuardrailAnswer.DENIED: Reason.GUARDRAIL_DENIED,
    GuardrailAnswer.UNREACHABLE: Reason.GUARDRAIL_UNREACHABLE,
}


class Decision(enum.StrEnum):
    """What a ``transport.fallback.considered`` event decided."""

    ACTIVATE = "activate"
    DECLINE = "decline"


@dataclass(frozen=True)
class LadderEvent:
    """A telemetry record: ``name`` is :data:`CONSIDERED` or :data:`ACTIVATED`.

    ``reasons`` are the codes gathered so far (first-seen order, no repeats), ``attempts``
    the number of primary and TURN attempts made, ``decision`` is set on considered events
    only.
    """

    name: str
    session_id: str
    reasons: tuple[Reason, ...]
    attempts: int
    decision: Decision | None = None

    def fields(self) -> dict[str, object]:
        """The event's data as JSON-friendly log fields (the name is the log event itself)."""
        out: dict[str, object] = {"session_id": self.session_id,
                                  "reasons": [str(r) for r in self.reasons],
                                  "attempts": self.attempts}
        if self.decision is not None:
            out["decision"] = str(self.decision)
        return out


@dataclass(frozen=True)
class LadderPolicy:
    """How hard to try each rung; raises ValueError for a policy that makes no sense.

    The first primary attempt starts at once; attempt ``k >= 2`` waits
    ``min(primary_backoff_cap_s, primary_backoff_s * 2 ** (k - 2))`` seconds.
    """

    primary_attempts: int = 3
    primary_backoff_s: float = 0.5
    primary_backoff_cap_s: float = 8.0
    turn_configured: bool = False
    fallback_flag: bool = False

    def __post_init__(self) -> None:
        if self.primary_attempts < 1:
            raise ValueError("primary_attempts must be at least 1")
        if not 0.0 <= self.primary_backoff_s <= self.primary_backoff_cap_s:
            raise ValueError("need 0 <= primary_backoff_s <= primary_backoff_cap_s")

    def backoff_before(self, attempt: int) -> float:
        """Seconds to wait before primary attempt ``attempt`` (1-based): 0 for the first."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        if attempt == 1:
            return 0.0
        try:
            delay = math.ldexp(self.primary_backoff_s, attempt - 2)  # base * 2 ** (k - 2)
        except OverflowError:  # far past any cap
            delay = math.inf
        return min(self.primary_backoff_cap_s, delay)


# -- Actions: what the caller must do next. ------------------------------------------------

@dataclass(frozen=True)
class TryPrimary:
    """Wait ``delay_s`` seconds, then make primary attempt number ``attempt`` (from 1)."""

    attempt: int
    delay_s: float


@dataclass(frozen=True)
class TryTurn:
    """Make the one TURN-relayed attempt."""


@dataclass(frozen=True)
class ConsiderFallback:
    """Ask the guardrail whether the WebSocket fallback may be used; report the answer."""

    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class UseFallback:
    """Open the WebSocket fallback channel and report how it went."""


@dataclass(frozen=True)
class Established:
    """Done: the channel just opened on ``transport`` is the one to use."""

    transport: TransportKind


@dataclass(frozen=True)
class GiveUp:
    """Done: no transport could be established, for ``reasons``."""

    reasons: tuple[Reason, ...]


Action = TryPrimary | TryTurn | ConsiderFallback | UseFallback | Established | GiveUp


# -- Outcomes: what the caller reports back. ------------------------------------------------

@dataclass(frozen=True)
class PrimaryResult:
    """Primary attempt ``attempt`` succeeded (``failure`` None) or failed for ``failure``."""

    attempt: int
    failure: Reason | None = None


@dataclass(frozen=True)
class TurnResult:
    """The TURN attempt succeeded (``failure`` None) or failed (recorded as turn_failed)."""

    failure: Reason | None = None


@dataclass(frozen=True)
class GuardrailResult:
    """The guardrail's answer to a :class:`ConsiderFallback`."""

    answer: GuardrailAnswer


@dataclass(frozen=True)
class FallbackResult:
    """The fallback channel opened (``failure`` None) or did not, for ``failure``."""

    failure: Reason | None = None


Outcome = PrimaryResult | TurnResult | GuardrailResult | FallbackResult


class LadderState(enum.Enum):
    """Where the ladder stands; ESTABLISHED and GAVE_UP are final."""

    NEW = "new"
    PRIMARY = "primary"
    TURN = "turn"
    GUARDRAIL = "guardrail"
    FALLBACK = "fallback"
    ESTABLISHED = "established"
    GAVE_UP = "gave_up"


#: The one outcome type each state waits for; states not listed accept no outcome.
_EXPECTED: dict[LadderState, type[Outcome]] = {
    LadderState.PRIMARY: PrimaryResult,
    LadderState.TURN: TurnResult,
    LadderState.GUARDRAIL: GuardrailResult,
    LadderState.FALLBACK: FallbackResult,
}


class LadderError(RuntimeError):
    """An outcome the ladder is not waiting for: a bug in the caller."""


class Ladder:
    """The escalation ladder for one session; see the module docstring for the transitions.

    Call :meth:`start` once, then :meth:`handle` with the outcome of each action until it
    returns :class:`Established` or :class:`GiveUp`; take the telemetry with
    :meth:`events_to_emit` after each call.
    """

    def __init__(self, policy: LadderPolicy, session_id: str) -> None:
        self.policy = policy
        self.session_id = session_id
        self._state = LadderState.NEW
        self._attempt = 0           # the primary attempt in progress (or last made)
        self._attempts = 0          # primary and TURN attempts made
        self._reasons: list[Reason] = []
        self._events: list[LadderEvent] = []

    @property
    def state(self) -> LadderState:
        """The current state."""
        return self._state

    @property
    def reasons(self) -> tuple[Reason, ...]:
        """Reason codes gathered so far, first-seen order, no repeats."""
        return tuple(self._reasons)

    @property
    def attempts(self) -> int:
        """Primary and TURN attempts made (counted when their outcome is reported)."""
        return self._attempts

    def events_to_emit(self) -> list[LadderEvent]:
        """Return the events recorded since the last call, oldest first, and forget them."""
        events, self._events = self._events, []
        return events

    def start(self) -> Action:
        """Begin: returns the first primary attempt. Raises LadderError if already started."""
        if self._state is not LadderState.NEW:
            raise LadderError(f"start() in state {self._state.value}")
        return self._try_primary(1)

    def handle(self, outcome: Outcome) -> Action:
        """Record ``outcome`` and return the next action; LadderError if it is unexpected."""
        expected = _EXPECTED.get(self._state)
        if expected is None or not isinstance(outcome, expected):
            raise LadderError(f"{type(outcome).__name__} in state {self._state.value}")
        match outcome:
            case PrimaryResult():
                return self._primary_done(outcome)
            case TurnResult():
                self._attempts += 1
                if outcome.failure is None:
                    return self._establish(TransportKind.TURN)
                self._add(Reason.TURN_FAILED)
                return self._escalate()
            case GuardrailResult():
                return self._guardrail_answered(outcome.answer)
            case FallbackResult():
                if outcome.failure is None:
                    self._record(ACTIVATED)
                    return self._establish(TransportKind.WEBSOCKET_FALLBACK)
                self._add(outcome.failure)
                return self._give_up()
            case _:  # pragma: no cover - the table check above rules this out
                assert_never(outcome)

    # -- transitions ---------------------------------------------------------------------

    def _try_primary(self, attempt: int) -> TryPrimary:
        self._state = LadderState.PRIMARY
        self._attempt = attempt
        return TryPrimary(attempt, self.policy.backoff_before(attempt))

    def _primary_done(self, outcome: PrimaryResult) -> Action:
        if outcome.attempt != self._attempt:
            raise LadderError(f"result of attempt {outcome.attempt}, "
                              f"but attempt {self._attempt} is in progress")
        self._attempts += 1
        if outcome.failure is None:
            return self._establish(TransportKind.WEBRTC)
        self._add(outcome.failure)
        if self._attempt < self.policy.primary_attempts:
            return self._try_primary(self._attempt + 1)
        if self.policy.turn_configured:
            self._state = LadderState.TURN
            return TryTurn()
        self._add(Reason.TURN_NOT_CONFIGURED)
        return self._escalate()

    def _escalate(self) -> Action:
        if not self.policy.fallback_flag:
            self._add(Reason.FLAG_OFF)
            self._record(CONSIDERED, Decision.DECLINE)
            return self._give_up()
        self._state = LadderState.GUARDRAIL
        return ConsiderFallback(self.reasons)

    def _guardrail_answered(self, answer: GuardrailAnswer) -> Action:
        if answer is GuardrailAnswer.ALLOWED:
            self._record(CONSIDERED, Decision.ACTIVATE)
            self._state = LadderState.FALLBACK
            return UseFallback()
        self._add(_DECLINE_REASON[answer])
        self._record(CONSIDERED, Decision.DECLINE)
        return self._give_up()

    def _establish(self, transport: TransportKind) -> Established:
        self._state = LadderState.ESTABLISHED
        return Established(transport)

    def _give_up(self) -> GiveUp:
        self._state = LadderState.GAVE_UP
        return GiveUp(self.reasons)

    def _add(self, reason: Reason) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)

    def _record(self, name: str, decision: Decision | None = None) -> None:
        self._events.append(LadderEvent(name, self.session_id, self.reasons,
                                        self._attempts, decision))
