"""The supervisor's slot table: which worker serves which slot, and when to restart one.

A slot is a stable worker identity (0..N-1): it owns a listening socket and a hand-off
inbox, and the hash ring is built over slot ids, so a restarted worker takes its slot
back and no session moves. Sans-I/O: the arbiter feeds in process events with its clock
and acts on the answers (spawn, kill, exit).

Restart policy: a worker that dies (not asked to) is restarted in its slot after an
exponential backoff (``base_backoff_s`` doubling to ``max_backoff_s``). A worker that
dies before ``min_uptime_s`` counts as a boot failure; ``max_boot_failures`` in a row
make the table fatal (the supervisor exits non-zero and lets systemd decide).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class WorkerState(enum.Enum):
    """The life of one worker process."""

    BOOTING = "booting"  # forked, not yet reported ready
    READY = "ready"  # listening machinery up, waiting for the order to serve
    SERVING = "serving"  # accepting and adopting connections
    DRAINING = "draining"  # told to drain; will exit by itself
    STOPPING = "stopping"  # told to stop fast, or killed


@dataclass(slots=True)
class Worker:
    """One worker process as the supervisor knows it."""

    pid: int
    slot: int
    generation: int
    started_at: float
    state: WorkerState = WorkerState.BOOTING
    last_beat: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"beach-rescue worker {self.slot} gen {self.generation}"


@dataclass(slots=True)
class Slot:
    """Restart bookkeeping of one slot."""

    slot_id: int
    restarts: int = 0
    failures: int = 0
    next_start_at: float | None = 0.0


class BootLoop(Exception):
    """A slot's worker failed to boot ``max_boot_failures`` times in a row."""


class SlotTable:
    """Workers by pid and slots by id, with the restart and liveness decisions."""

    def __init__(self, slots: int, *, base_backoff_s: float = 0.1, max_backoff_s: float = 10.0,
                 min_uptime_s: float = 5.0, max_boot_failures: int = 5) -> None:
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.min_uptime_s = min_uptime_s
        self.max_boot_failures = max_boot_failures
        self.generation = 1
        self.slots: dict[int, Slot] = {i: Slot(i) for i in range(slots)}
        self.workers: dict[int, Worker] = {}

    # --- queries ---------------------------------------------------------------------
    def current(self, slot_id: int) -> Worker | None:
        """The worker of the current generation in ``slot_id``, if any."""
        for w in self.workers.values():
            if w.slot == slot_id and w.generation == self.generation and \
                    w.state is not WorkerState.STOPPING:
                return w
        return None

    def current_workers(self) -> list[Worker]:
        """Workers of the current generation, by slot."""
        found = [self.current(s) for s in sorted(self.slots)]
        return [w for w in found if w is not None]

    def old_workers(self) -> list[Worker]:
        """Workers of earlier generations (draining or about to)."""
        return [w for w in self.workers.values() if w.generation != self.generation]

    def all_current_in(self, *states: WorkerState) -> bool:
        """True when every slot has a current worker in one of ``states``."""
        return all((w := self.current(s)) is not None and w.state in states
                   for s in self.slots)

    def due_starts(self, now: float) -> list[int]:
        """Slots that have no current worker and whose backoff has elapsed."""
        return [s.slot_id for s in self.slots.values()
                if s.next_start_at is not None and now >= s.next_start_at
                and self.current(s.slot_id) is None]

    def next_deadline(self) -> float | None:
        """The earliest pending restart time, for the arbiter's sleep."""
        times = [s.next_start_at for s in self.slots.values()
                 if s.next_start_at is not None and self.current(s.slot_id) is None]
        return min(times, default=None)

    def stuck(self, now: float, deadline_s: float) -> list[Worker]:
        """Ready, serving or draining workers whose last beat is older than ``deadline_s``."""
        return [w for w in self.workers.values()
                if w.state in (WorkerState.READY, WorkerState.SERVING, WorkerState.DRAINING)
                and now - w.last_beat > deadline_s]

    def booting_too_long(self, now: float, deadline_s: float) -> list[Worker]:
        """Workers still booting ``deadline_s`` after their fork."""
        return [w for w in self.workers.values()
                if w.state is WorkerState.BOOTING and now - w.started_at > deadline_s]

    # --- events ----------------------------------------------------------------------
    def spawned(self, slot_id: int, pid: int, now: float) -> Worker:
        """Record a worker forked for ``slot_id`` in the current generation."""
        worker = Worker(pid, slot_id, self.generation, started_at=now, last_beat=now)
        self.workers[pid] = worker
        self.slots[slot_id].next_start_at = None
        return worker

    def beat(self, pid: int, now: float, stats: dict[str, Any] | None = None) -> None:
        """Record a heartbeat (and its stats) from ``pid``."""
        worker = self.workers.get(pid)
        if worker is not None:
            worker.last_beat = now
            if stats is not None:
                worker.stats = stats

    def exited(self, pid: int, now: float, *, restart: bool = True) -> Worker | None:
        """Record that ``pid`` exited; schedule its slot's restart when it was not asked to.

        Raises :class:`BootLoop` when the slot failed to boot too many times in a row.
        """
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None
        slot = self.slots.get(worker.slot)
        asked = worker.state in (WorkerState.DRAINING, WorkerState.STOPPING)
        if slot is None or worker.generation != self.generation or asked or not restart:
            return worker
        if now - worker.started_at < self.min_uptime_s or worker.state is WorkerState.BOOTING:
            slot.failures += 1
        else:
            slot.failures = 0
        if slot.failures >= self.max_boot_failures:
            raise BootLoop(f"worker of slot {slot.slot_id} failed {slot.failures} times in a "
                           "row right after starting")
        slot.restarts += 1
        delay = 0.0 if slot.failures == 0 else min(
            self.max_backoff_s, self.base_backoff_s * 2 ** (slot.failures - 1))
        slot.next_start_at = now + delay
        return worker

    def new_generation(self, slots: int, now: float) -> int:
        """Start a new generation over ``slots`` slots (all due now); return its number."""
        self.generation += 1
        self.slots = {i: self.slots.get(i, Slot(i)) for i in range(slots)}
        for slot in self.slots.values():
            slot.next_start_at = now
            slot.failures = 0
        return self.generation
