"""The fallback guardrail: per cohort and UTC hour, fallback tokens over sessions created.

Sans-I/O. The store keeps two counters per cohort-hour (``fallback`` and ``total``,
expiring after ``COUNTER_TTL_S``); this module names their keys, turns the counts into a
decision, and remembers which cohort-hours already logged their soft breach so the log
event fires once per cohort-hour per process.

Policy (protocol section 7): at or over ``threshold`` (default 0.5 %), a token is still
issued but marked ``soft_breach``; at or over ``hard_threshold`` (off by default) the
fallback pauses itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

COUNTER_TTL_S = 5400
"""90 minutes: a counter outlives its hour long enough to be read at the next one's start."""
KEY_PREFIX = "beach-rescue:guardrail"


def hour_bucket(now: float) -> str:
    """The UTC hour ``now`` falls in, as ``YYYY-MM-DD-HH``."""
    return time.strftime("%Y-%m-%d-%H", time.gmtime(now))


def counter_keys(cohort: str, now: float) -> tuple[str, str]:
    """Store keys ``(fallback, total)`` for ``cohort`` in the hour of ``now``."""
    base = f"{KEY_PREFIX}:{cohort}:{hour_bucket(now)}"
    return f"{base}:fallback", f"{base}:total"


@dataclass(frozen=True, slots=True)
class GuardrailState:
    """The guardrail as a token response reports it."""

    ratio: float
    soft_breach: bool
    hard_breach: bool
    fallback: int
    total: int


def evaluate(fallback: int, total: int, *, threshold: float,
             hard_threshold: float = 0.0, hard_min_sessions: int = 1) -> GuardrailState:
    """Decide the guardrail state from this hour's counts (``fallback`` includes this token).

    With no session counted yet the ratio is that of one session (every fallback is a
    fallback of at least one session), so a cohort that never reports sessions breaches
    softly. A hard breach needs at least ``hard_min_sessions`` sessions counted: a small
    or silent cohort must not switch the fallback off for everyone.
    """
    ratio = fallback / max(total, 1)
    return GuardrailState(
        ratio=ratio,
        soft_breach=ratio >= threshold,
        hard_breach=(hard_threshold > 0 and total >= hard_min_sessions
                     and ratio >= hard_threshold),
        fallback=fallback, total=total)


class BreachLog:
    """Remembers the cohort-hours whose soft breach was already logged (bounded)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def first(self, cohort: str, now: float) -> bool:
        """True the first time a breach of ``cohort`` in the hour of ``now`` is reported."""
        key = (cohort, hour_bucket(now))
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True
