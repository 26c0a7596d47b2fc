"""Sampling each relay worker's resident memory and open file descriptors over time.

A soak calls :meth:`WorkerSamples.take` at intervals; each call reads every live worker
of the node with psutil. Samples are kept per slot, with the worker's pid, so a worker
that was replaced meanwhile (a new pid in its slot) is visible rather than averaged in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from tests.support.processes import worker_processes
from tests.support.relay import RelayProcess
from tests.support.trend import Line, fit_line


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one worker."""

    t: float  # seconds since the sampling began
    pid: int
    rss: int  # bytes
    fds: int


@dataclass
class WorkerSamples:
    """Readings per slot, and least-squares trends over them."""

    relay: RelayProcess
    started_at: float
    by_slot: dict[int, list[Sample]] = field(default_factory=dict)

    def take(self, now: float) -> None:
        """Read every live worker now (``now`` on the same clock as ``started_at``)."""
        for pid, (slot, _gen) in worker_processes(self.relay).items():
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    rss, fds = proc.memory_info().rss, proc.num_fds()
            except psutil.NoSuchProcess:
                continue
            self.by_slot.setdefault(slot, []).append(Sample(now - self.started_at, pid, rss,
                                                            fds))

    def pids(self, slot: int) -> set[int]:
        """Every pid seen in ``slot``."""
        return {s.pid for s in self.by_slot.get(slot, [])}

    def trend(self, slot: int, what: str, since_s: float = 0.0) -> Line:
        """The fitted line of ``what`` ("rss" or "fds") for ``slot`` from ``since_s`` on."""
        samples = [s for s in self.by_slot.get(slot, []) if s.t >= since_s]
        return fit_line([s.t for s in samples], [float(getattr(s, what)) for s in samples])

    def values(self, slot: int, what: str, since_s: float = 0.0) -> list[int]:
        """The raw readings of ``what`` for ``slot`` from ``since_s`` on."""
        return [int(getattr(s, what)) for s in self.by_slot.get(slot, []) if s.t >= since_s]
