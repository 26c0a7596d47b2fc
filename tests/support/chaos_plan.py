"""What a chaos run does and when, drawn from one seed: the same seed, the same plan.

The plan is data only (no processes, no clock): session arrivals and lifetimes, SDK
channel pairs, worker kills, worker stalls (SIGSTOP, then SIGCONT), Redis outages and the
seed of the peer picks for the 5 %-per-second disconnects. Times are seconds from the
start of the run. Which peers a disconnect tick hits also depends on which peers are
connected at that instant, so a replay with the same seed repeats the schedule exactly
and the picks as closely as timing allows (see :func:`pick_peers`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One session: when it starts and how long its peers stay (seconds)."""

    at_s: float
    lifetime_s: float


@dataclass(frozen=True, slots=True)
class WorkerKill:
    """SIGKILL the worker serving ``slot`` at ``at_s``."""

    at_s: float
    slot: int


@dataclass(frozen=True, slots=True)
class WorkerStall:
    """SIGSTOP the worker serving ``slot`` at ``at_s``, SIGCONT it ``for_s`` later."""

    at_s: float
    slot: int
    for_s: float


@dataclass(frozen=True, slots=True)
class RedisOutage:
    """SIGKILL redis-server at ``at_s`` and start it again, same port, ``for_s`` later."""

    at_s: float
    for_s: float


@dataclass(frozen=True, slots=True)
class ChaosShape:
    """The knobs of a run; :func:`make_plan` turns them and a seed into a plan."""

    duration_s: float  # the chaos window: faults happen inside it
    workers: int
    sessions: int  # light protocol sessions (host + participant each)
    session_lifetime_s: tuple[float, float]  # uniform bounds
    sdk_pairs: int  # SDK channel pairs streaming both ways
    sdk_lifetime_s: tuple[float, float]
    kill_every_s: float = 10.0
    stall_every_s: float = 60.0
    stall_s: float = 2.0
    outage_every_s: float = 90.0
    outage_s: tuple[float, float] = (3.0, 5.0)
    disconnect_share_per_s: float = 0.05
    fault_gap_s: float = 3.0  # no two worker faults closer than this


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """Everything a run will do, from one seed."""

    seed: int
    shape: ChaosShape
    sessions: list[Arrival]
    sdk_pairs: list[Arrival]
    kills: list[WorkerKill]
    stalls: list[WorkerStall]
    outages: list[RedisOutage]
    picks_seed: int = field(default=0)

    @property
    def ends_at_s(self) -> float:
        """When the last session's or pair's planned life ends."""
        return max((a.at_s + a.lifetime_s for a in (*self.sessions, *self.sdk_pairs)),
                   default=0.0)

    def describe(self) -> str:
        """One line for logs and assertion messages (the seed first, to replay it)."""
        kills = ", ".join(f"{k.at_s:.1f}s:slot{k.slot}" for k in self.kills)
        stalls = ", ".join(f"{s.at_s:.1f}s:slot{s.slot}/{s.for_s:.1f}s" for s in self.stalls)
        outages = ", ".join(f"{o.at_s:.1f}s/{o.for_s:.1f}s" for o in self.outages)
        return (f"seed={self.seed} window={self.shape.duration_s:.0f}s "
                f"sessions={len(self.sessions)} sdk_pairs={len(self.sdk_pairs)} "
                f"kills=[{kills}] stalls=[{stalls}] redis_outages=[{outages}]")


def _arrivals(rng: random.Random, count: int, window_s: float,
              lifetime_s: tuple[float, float]) -> list[Arrival]:
    """``count`` sessions starting uniformly so that each ends inside ``window_s``."""
    low, high = lifetime_s
    latest = max(window_s - high, 0.0)
    starts = sorted(rng.uniform(0.0, latest) for _ in range(count))
    return [Arrival(round(at, 3), round(rng.uniform(low, high), 3)) for at in starts]


def _periodic(rng: random.Random, every_s: float, window_s: float,
              jitter_s: float) -> list[float]:
    """Times ``every_s`` apart (± ``jitter_s``) ending a second before the window does; at
    least one (in the middle of a window shorter than a period)."""
    count = int((window_s - jitter_s - 1.0) // every_s)
    centers = [(k + 1) * every_s for k in range(count)] or [window_s / 2]
    return [round(c + rng.uniform(-jitter_s, jitter_s), 3) for c in centers]


def make_plan(seed: int, shape: ChaosShape) -> ChaosPlan:
    """The plan for ``seed``: kills every ``kill_every_s`` (at least one), a stall every
    ``stall_every_s`` placed ``fault_gap_s`` away from every kill (at least one), a Redis
    outage every ``outage_every_s`` (at least one, starting while SDK pairs still
    arrive); all faults end inside the window."""
    rng = random.Random(seed)
    window = shape.duration_s
    sessions = _arrivals(rng, shape.sessions, window, shape.session_lifetime_s)
    pairs = _arrivals(rng, shape.sdk_pairs, window, shape.sdk_lifetime_s)
    kills = [WorkerKill(at, rng.randrange(shape.workers))
             for at in _periodic(rng, shape.kill_every_s, window, 1.0)]
    stalls = []
    for k in range(max(1, int(window // shape.stall_every_s))):
        low = k * shape.stall_every_s + shape.fault_gap_s
        high = min((k + 1) * shape.stall_every_s, window) - shape.stall_s - shape.fault_gap_s
        for _ in range(1000):
            at = round(rng.uniform(low, max(low, high)), 3)
            if all(abs(at - kill.at_s) >= shape.fault_gap_s and
                   abs(at + shape.stall_s - kill.at_s) >= shape.fault_gap_s for kill in kills):
                break
        else:
            raise ValueError(f"no room for a stall between the kills of {shape}")
        stalls.append(WorkerStall(at, rng.randrange(shape.workers), shape.stall_s))
    outages = []
    # While SDK pairs still arrive, so that some of them ask for tokens during an outage.
    arrivals_end = window - shape.sdk_lifetime_s[1] if shape.sdk_pairs else window
    for k in range(max(1, int(window // shape.outage_every_s))):
        length = round(rng.uniform(*shape.outage_s), 3)
        low = k * shape.outage_every_s + 1.0
        high = min((k + 1) * shape.outage_every_s, window - length - 1.0, arrivals_end)
        outages.append(RedisOutage(round(rng.uniform(low, max(low, high)), 3), length))
    return ChaosPlan(seed=seed, shape=shape, sessions=sessions, sdk_pairs=pairs, kills=kills,
                     stalls=stalls, outages=outages, picks_seed=rng.getrandbits(64))


class DisconnectPicker:
    """Chooses the peers a once-a-second tick disconnects: ``share`` of those connected.

    Fractions carry over from tick to tick, so over a run exactly ``share`` of the
    connected peers per second are hit on average, even when ``share * count`` < 1.
    """

    def __init__(self, seed: int, share: float) -> None:
        self.rng = random.Random(seed)
        self.share = share
        self._carry = 0.0

    def pick(self, connected: Sequence[T]) -> list[T]:
        """The peers to disconnect now, from ``connected`` in a stable order."""
        due = self.share * len(connected) + self._carry
        count = min(int(due), len(connected))
        self._carry = due - count
        return pick_peers(self.rng, connected, count)


def pick_peers(rng: random.Random, peers: Sequence[T], count: int) -> list[T]:
    """``count`` distinct peers of ``peers`` drawn with ``rng`` (the order of ``peers``
    decides which, so callers pass them in a stable order)."""
    return rng.sample(list(peers), count)
