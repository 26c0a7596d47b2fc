"""The drain state machine of a worker: who to tell to reconnect, when, and when to give up.

A drain (SIGTERM for the node, SIGHUP for a reload) must not turn into a reconnect storm:
peers are told ``draining`` and closed with 1012 a batch at a time, evenly over
``window_s``, each with a ``reconnect_after_ms`` hint jittered over ``spread_ms``. The
worker is done when its last peer has gone, or at ``deadline_s`` (then the rest are
dropped). Sans-I/O: the worker calls :meth:`Drainer.step` on a timer with the loop time
and the counts of connections still open and of peers not yet told, and does
what the returned step says.

States::

    SERVING --start()--> DRAINING --(no peers left)--> DRAINED
                              \\--(deadline passed)--> EXPIRED
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


class Phase(enum.Enum):
    """Where a worker is in its drain."""

    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Step:
    """What to do now: notify ``notify`` more peers; if ``phase`` ended, stop."""

    phase: Phase
    notify: int

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DRAINED, Phase.EXPIRED)


class Drainer:
    """Paces one worker's drain. Time is the caller's monotonic clock, in seconds."""

    def __init__(self, *, window_s: float, deadline_s: float, spread_ms: int = 1000,
                 rng: random.Random | None = None) -> None:
        if deadline_s < window_s:
            raise ValueError("the drain deadline must not be shorter than its window")
        self.window_s = window_s
        self.deadline_s = deadline_s
        self.spread_ms = spread_ms
        self.phase = Phase.SERVING
        self.started_at = 0.0
        self.total = 0
        self.notified = 0
        self._rng = rng or random.Random()

    def start(self, now: float, peers: int) -> None:
        """Begin draining ``peers`` connections at ``now``; later calls are ignored."""
        if self.phase is not Phase.SERVING:
            return
        self.phase = Phase.DRAINING
        self.started_at = now
        self.total = peers

    def step(self, now: float, connected: int, unnotified: int) -> Step:
        """Advance to ``now``; return how many of the ``unnotified`` peers to tell now.

        ``connected`` counts every connection still open (notified peers on their way
        out and handshakes included); the drain is complete when it reaches 0. At the
        deadline the step is EXPIRED and still names the peers never told, so the worker
        can send them the hint before it drops everything.
        """
        if self.phase is Phase.DRAINING and connected == 0:
            self.phase = Phase.DRAINED
        if self.phase is not Phase.DRAINING:
            return Step(self.phase, 0)
        elapsed = now - self.started_at
        if elapsed >= self.window_s:
            batch = unnotified  # the window is over: everyone left, late joiners too
        else:
            due = max(1, math.ceil(self.total * elapsed / self.window_s))
            batch = max(0, min(due - self.notified, unnotified))
        self.notified += batch
        if elapsed >= self.deadline_s:
            self.phase = Phase.EXPIRED
        return Step(self.phase, batch)

    def reconnect_after_ms(self) -> int:
        """A jittered reconnect hint for one peer's ``draining`` event."""
        return self._rng.randint(0, self.spread_ms) if self.spread_ms > 0 else 0
