"""Reconnect delays: exponential backoff with full jitter, bounded in time.

Sans-I/O: the caller passes ``now`` and a random source, so tests use fake clocks and
seeded generators. "Full jitter" draws each delay uniformly from ``[0, min(cap, base·2^n)]``
so a crowd of clients dropped at once spreads its returns instead of stampeding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How a channel paces its reconnect attempts and when it gives up."""

    base_s: float = 0.25
    cap_s: float = 10.0
    give_up_after_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")
        if self.give_up_after_s <= 0:
            raise ValueError("give_up_after_s must be positive")


@dataclass
class Backoff:
    """The attempts since a connection was lost; reset when a connection succeeds."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0
    lost_at: float | None = None

    def lost(self, now: float) -> None:
        """Record that the connection is gone (the give-up clock starts at the first loss)."""
        if self.lost_at is None:
            self.lost_at = now

    def next_delay(self, now: float, *, at_least_s: float = 0.0) -> float | None:
        """Seconds to wait before the next attempt, or None when it is time to give up.

        ``at_least_s`` is a floor the relay asked for (``reconnect_after_ms`` of a
        ``draining`` event, or an HTTP ``Retry-After``); it replaces the jittered delay
        when larger.
        """
        started = self.lost_at if self.lost_at is not None else now
        if now - started >= self.policy.give_up_after_s:
            return None
        ceiling = min(self.policy.cap_s, self.policy.base_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        delay = max(self.rng.uniform(0.0, ceiling), at_least_s)
        remaining = self.policy.give_up_after_s - (now - started)
        return min(delay, max(remaining, 0.0))

    def succeeded(self) -> None:
        """A connection was established: the next loss starts from scratch."""
        self.attempts = 0
        self.lost_at = None
