"""Tests for supervisor.slots: the slot table's restart and liveness decisions (fake clock)."""

from __future__ import annotations

import itertools

import pytest

from supervisor.slots import BootLoop, SlotTable, Worker, WorkerState

BASE, CAP, MIN_UP = 0.1, 10.0, 5.0

_pids = itertools.count(1000)


def table(slots: int = 2, **kwargs: float) -> SlotTable:
    options: dict[str, float] = {"base_backoff_s": BASE, "max_backoff_s": CAP,
                                 "min_uptime_s": MIN_UP, "max_boot_failures": 5}
    options.update(kwargs)
    return SlotTable(slots, base_backoff_s=options["base_backoff_s"],
                     max_backoff_s=options["max_backoff_s"],
                     min_uptime_s=options["min_uptime_s"],
                     max_boot_failures=int(options["max_boot_failures"]))


def spawn(t: SlotTable, slot: int, now: float, state: WorkerState = WorkerState.SERVING
          ) -> Worker:
    """Fork-and-report: the arbiter records the worker, then it moves to ``state``."""
    worker = t.spawned(slot, next(_pids), now)
    worker.state = state
    return worker


def start_all(t: SlotTable, now: float) -> list[Worker]:
    return [spawn(t, slot, now) for slot in t.due_starts(now)]


# --- start-up -------------------------------------------------------------------------------------
def test_a_new_table_wants_every_slot_started_now() -> None:
    t = table(3)
    assert t.generation == 1
    assert t.due_starts(0.0) == [0, 1, 2]
    assert t.next_deadline() == 0.0
    assert t.current_workers() == []
    assert not t.all_current_in(WorkerState.BOOTING)


def test_spawned_records_a_booting_worker_in_the_current_generation() -> None:
    t = table(2)
    worker = t.spawned(1, 4242, now=7.0)
    assert (worker.pid, worker.slot, worker.generation) == (4242, 1, 1)
    assert worker.state is WorkerState.BOOTING
    assert worker.started_at == worker.last_beat == 7.0
    assert t.workers[4242] is worker
    assert t.current(1) is worker
    assert t.current(0) is None
    assert t.due_starts(7.0) == [0]
    assert worker.title == "beach-rescue worker 1 gen 1"


def test_queries_once_every_slot_is_up() -> None:
    t = table(3)
    workers = start_all(t, 0.0)
    assert t.current_workers() == workers
    assert t.due_starts(100.0) == []
    assert t.next_deadline() is None
    assert t.old_workers() == []
    assert t.all_current_in(WorkerState.SERVING)
    assert t.all_current_in(WorkerState.READY, WorkerState.SERVING)
    workers[1].state = WorkerState.READY
    assert not t.all_current_in(WorkerState.SERVING)
    assert t.all_current_in(WorkerState.READY, WorkerState.SERVING)


def test_current_workers_are_listed_by_slot() -> None:
    t = table(3)
    late = spawn(t, 2, 0.0)
    early = spawn(t, 0, 0.0)
    middle = spawn(t, 1, 0.0)
    assert t.current_workers() == [early, middle, late]


# --- heartbeats and liveness ----------------------------------------------------------------------
def test_beat_updates_time_and_stats() -> None:
    t = table(1)
    worker = spawn(t, 0, 0.0)
    t.beat(worker.pid, 3.0, {"connections": 12})
    assert (worker.last_beat, worker.stats) == (3.0, {"connections": 12})
    t.beat(worker.pid, 4.0)  # no stats: the last ones stay
    assert (worker.last_beat, worker.stats) == (4.0, {"connections": 12})
    t.beat(999_999, 5.0, {"x": 1})  # unknown pid: ignored
    assert 999_999 not in t.workers


def test_stuck_lists_live_workers_silent_for_longer_than_the_deadline() -> None:
    t = table(4)
    booting = spawn(t, 0, 0.0, WorkerState.BOOTING)
    ready = spawn(t, 1, 0.0, WorkerState.READY)
    serving = spawn(t, 2, 0.0, WorkerState.SERVING)
    draining = spawn(t, 3, 0.0, WorkerState.DRAINING)
    stopping = t.spawned(0, next(_pids), 0.0)
    stopping.state = WorkerState.STOPPING
    assert t.stuck(10.0, 10.0) == []  # exactly at the deadline: not yet
    t.beat(serving.pid, 5.0)
    stuck = t.stuck(10.5, 10.0)
    assert {w.pid for w in stuck} == {ready.pid, draining.pid}
    assert booting not in stuck and stopping not in stuck  # booting has its own deadline
    assert {w.pid for w in t.stuck(15.5, 10.0)} == {ready.pid, serving.pid, draining.pid}


def test_booting_too_long() -> None:
    t = table(2)
    slow = spawn(t, 0, 0.0, WorkerState.BOOTING)
    up = spawn(t, 1, 0.0, WorkerState.READY)
    assert t.booting_too_long(30.0, 30.0) == []
    assert t.booting_too_long(30.1, 30.0) == [slow]
    assert up not in t.booting_too_long(100.0, 30.0)
    slow.state = WorkerState.READY
    assert t.booting_too_long(100.0, 30.0) == []


# --- restarts -------------------------------------------------------------------------------------
def test_a_worker_dying_after_min_uptime_is_restarted_at_once() -> None:
    t = table(2)
    workers = start_all(t, 0.0)
    gone = t.exited(workers[0].pid, 100.0)
    assert gone is workers[0]
    assert workers[0].pid not in t.workers
    assert t.current(0) is None
    assert t.due_starts(100.0) == [0]
    assert t.next_deadline() == 100.0
    assert t.slots[0].restarts == 1
    assert t.slots[0].failures == 0


def test_quick_deaths_back_off_doubling_up_to_the_cap() -> None:
    t = table(1, max_boot_failures=100)
    now = 0.0
    delays = []
    for _ in range(10):
        worker = spawn(t, 0, now, WorkerState.BOOTING)
        now += 1.0  # dies one second after its fork
        t.exited(worker.pid, now)
        deadline = t.next_deadline()
        assert deadline is not None
        delays.append(round(deadline - now, 9))
        assert t.due_starts(deadline - 1e-6) == []
        assert t.due_starts(deadline) == [0]
        now = deadline
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert t.slots[0].failures == 10
    assert t.slots[0].restarts == 10


def test_a_ready_worker_dying_before_min_uptime_counts_as_a_failure() -> None:
    t = table(1)
    worker = spawn(t, 0, 0.0, WorkerState.SERVING)
    t.exited(worker.pid, MIN_UP - 0.01)
    assert t.slots[0].failures == 1
    assert t.next_deadline() == pytest.approx(MIN_UP - 0.01 + BASE)


def test_a_worker_still_booting_after_min_uptime_counts_as_a_failure() -> None:
    t = table(1)
    worker = spawn(t, 0, 0.0, WorkerState.BOOTING)
    t.exited(worker.pid, MIN_UP + 20.0)
    assert t.slots[0].failures == 1
    assert t.next_deadline() == pytest.approx(MIN_UP + 20.0 + BASE)


def test_a_long_lived_worker_resets_the_failure_count() -> None:
    t = table(1)
    now = 0.0
    for _ in range(3):
        worker = spawn(t, 0, now, WorkerState.BOOTING)
        t.exited(worker.pid, now + 0.5)
        now = t.next_deadline() or now
    assert t.slots[0].failures == 3
    worker = spawn(t, 0, now)
    t.exited(worker.pid, now + MIN_UP + 1.0)
    assert t.slots[0].failures == 0
    assert t.next_deadline() == now + MIN_UP + 1.0  # no backoff
    assert t.slots[0].restarts == 4


def test_too_many_quick_deaths_in_a_row_is_a_boot_loop() -> None:
    t = table(2, max_boot_failures=3)
    now = 0.0
    for _ in range(2):
        worker = spawn(t, 1, now, WorkerState.BOOTING)
        t.exited(worker.pid, now + 0.1)
        now = t.next_deadline() or now
    worker = spawn(t, 1, now, WorkerState.BOOTING)
    with pytest.raises(BootLoop, match="slot 1 failed 3 times"):
        t.exited(worker.pid, now + 0.1)


def test_failures_are_counted_per_slot() -> None:
    t = table(2, max_boot_failures=3)
    now = 0.0
    for slot in (0, 1, 0, 1):
        worker = spawn(t, slot, now, WorkerState.BOOTING)
        t.exited(worker.pid, now + 0.1)
        now += 1.0
    assert (t.slots[0].failures, t.slots[1].failures) == (2, 2)


@pytest.mark.parametrize("state", [WorkerState.DRAINING, WorkerState.STOPPING])
def test_workers_asked_to_leave_are_not_restarted(state: WorkerState) -> None:
    t = table(2)
    workers = start_all(t, 0.0)
    workers[0].state = state
    assert t.current(0) is (None if state is WorkerState.STOPPING else workers[0])
    assert t.exited(workers[0].pid, 100.0) is workers[0]
    assert t.due_starts(1000.0) == []
    assert t.next_deadline() is None
    assert (t.slots[0].restarts, t.slots[0].failures) == (0, 0)


def test_exits_are_not_restarted_when_told_so() -> None:
    t = table(1)
    (worker,) = start_all(t, 0.0)
    assert t.exited(worker.pid, 1.0, restart=False) is worker  # a quick death, even
    assert t.due_starts(1000.0) == []
    assert t.slots[0].failures == 0


def test_an_unknown_pid_exiting_changes_nothing() -> None:
    t = table(1)
    start_all(t, 0.0)
    assert t.exited(123_456_789, 1.0) is None
    assert t.due_starts(10.0) == []


# --- generations (reloads) ------------------------------------------------------------------------
def test_a_new_generation_starts_every_slot_and_keeps_the_old_workers_apart() -> None:
    t = table(2)
    old = start_all(t, 0.0)
    assert t.new_generation(2, 50.0) == 2
    assert t.generation == 2
    assert t.old_workers() == old
    assert t.current_workers() == []
    assert t.due_starts(50.0) == [0, 1]
    assert t.next_deadline() == 50.0
    new = start_all(t, 50.0)
    assert all(w.generation == 2 for w in new)
    assert t.current_workers() == new
    assert t.all_current_in(WorkerState.SERVING)
    assert t.old_workers() == old  # until they exit


def test_old_generation_workers_are_never_restarted() -> None:
    t = table(2)
    old = start_all(t, 0.0)
    t.new_generation(2, 50.0)
    new = start_all(t, 50.0)
    # an old worker dies on its own (not even told to drain yet), quickly or not
    assert t.exited(old[0].pid, 51.0) is old[0]
    assert t.exited(old[1].pid, 52.0) is old[1]
    assert t.old_workers() == []
    assert t.due_starts(1000.0) == []
    assert t.current_workers() == new
    assert all(s.failures == 0 for s in t.slots.values())


def test_growing_adds_slots() -> None:
    t = table(2)
    old = start_all(t, 0.0)
    t.slots[0].restarts = 3
    t.new_generation(4, 10.0)
    assert sorted(t.slots) == [0, 1, 2, 3]
    assert t.slots[0].restarts == 3  # history of a kept slot stays
    assert t.due_starts(10.0) == [0, 1, 2, 3]
    start_all(t, 10.0)
    assert [w.slot for w in t.current_workers()] == [0, 1, 2, 3]
    assert t.old_workers() == old


def test_shrinking_drops_slots_and_their_workers_are_old() -> None:
    t = table(4)
    old = start_all(t, 0.0)
    t.new_generation(2, 10.0)
    assert sorted(t.slots) == [0, 1]
    assert t.due_starts(10.0) == [0, 1]
    assert t.old_workers() == old
    # a worker of a dropped slot exits: nothing to restart, nothing raised
    assert t.exited(old[3].pid, 10.5) is old[3]
    start_all(t, 10.0)
    assert t.all_current_in(WorkerState.SERVING)
    assert [w.slot for w in t.current_workers()] == [0, 1]


def test_a_new_generation_clears_backoff_and_failures() -> None:
    t = table(1)
    worker = spawn(t, 0, 0.0, WorkerState.BOOTING)
    t.exited(worker.pid, 0.5)
    worker = spawn(t, 0, 1.0, WorkerState.BOOTING)
    t.exited(worker.pid, 1.5)
    assert t.slots[0].failures == 2
    assert t.due_starts(1.5) == []
    t.new_generation(1, 1.5)
    assert t.slots[0].failures == 0
    assert t.due_starts(1.5) == [0]


def test_current_generation_crash_during_a_reload_is_restarted() -> None:
    t = table(1)
    start_all(t, 0.0)
    t.new_generation(1, 10.0)
    (new,) = start_all(t, 10.0)
    t.exited(new.pid, 100.0)
    assert t.due_starts(100.0) == [0]
