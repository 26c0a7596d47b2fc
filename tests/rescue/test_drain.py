"""Tests for rescue.drain: the paced drain of one worker, driven by a fake clock."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.drain import Drainer, Phase, Step

PHASE_ORDER = {Phase.SERVING: 0, Phase.DRAINING: 1, Phase.DRAINED: 2, Phase.EXPIRED: 2}


@dataclass
class Worker:
    """A worker as the drain loop sees it.

    ``waiting`` peers were not told yet; ``closing`` peers were told and are still open
    (their close handshake); ``handshaking`` connections are open but not peers yet.
    With ``linger=False`` a told peer stops counting at once (the real ``Peer.close``
    detaches immediately); with ``linger=True`` it stays connected until :meth:`closed`.
    """

    drainer: Drainer
    waiting: int
    linger: bool = False
    closing: int = 0
    handshaking: int = 0
    told: int = 0

    @property
    def connected(self) -> int:
        return self.waiting + self.closing + self.handshaking

    def tick(self, now: float) -> Step:
        waiting = self.waiting
        step = self.drainer.step(now, self.connected, waiting)
        assert 0 <= step.notify <= waiting
        self.waiting -= step.notify
        self.told += step.notify
        if self.linger:
            self.closing += step.notify
        assert self.drainer.notified == self.told  # the drainer counts what it asked for
        return step

    def closed(self, count: int) -> None:
        """``count`` told peers finish their close handshake."""
        self.closing -= min(count, self.closing)


def run(peers: int, window_s: float, times: list[float], deadline_s: float = 60.0,
        linger: bool = False) -> list[int]:
    """Cumulative peers told after each tick at ``times``, nobody leaving by themselves."""
    worker = Worker(Drainer(window_s=window_s, deadline_s=deadline_s), peers, linger=linger)
    worker.drainer.start(0.0, peers)
    told = []
    for now in times:
        worker.tick(now)
        told.append(worker.told)
    return told


# --- pacing --------------------------------------------------------------------------------
@pytest.mark.parametrize("linger", [False, True], ids=["detach-at-once", "told-stay-open"])
def test_notifications_are_spread_evenly_over_the_window(linger: bool) -> None:
    times = [i * 0.5 for i in range(21)]  # 0 .. 10 s, window 10 s
    told = run(100, 10.0, times, linger=linger)
    assert told == [max(1, math.ceil(100 * t / 10.0)) for t in times]
    assert told[0] == 1 and told[10] == 50 and told[-1] == 100


@pytest.mark.parametrize("linger", [False, True], ids=["detach-at-once", "told-stay-open"])
def test_every_peer_is_told_by_the_end_of_the_window_even_with_coarse_ticks(linger: bool
                                                                            ) -> None:
    told = run(1000, 5.0, [0.0, 0.1, 4.9, 7.3, 8.0, 9.0], linger=linger)
    assert told[:3] == [1, 20, 980]
    assert told[3:] == [1000, 1000, 1000]  # and never more, however often it ticks


def test_batches_follow_the_schedule_not_the_untold_count() -> None:
    drainer = Drainer(window_s=10.0, deadline_s=30.0)
    drainer.start(0.0, 100)
    assert drainer.step(0.0, 100, 100) == Step(Phase.DRAINING, 1)
    # 99 untold are there, but only 20 are due by 2 s
    assert drainer.step(2.0, 100, 99) == Step(Phase.DRAINING, 19)
    assert drainer.notified == 20


def test_batches_never_exceed_the_peers_not_yet_told() -> None:
    drainer = Drainer(window_s=10.0, deadline_s=30.0)
    drainer.start(0.0, 100)
    assert drainer.step(0.0, 100, 100).notify == 1
    # most left on their own: the schedule says 50 are due, only 3 untold are there
    # (plus the one told at 0 s, still closing)
    assert drainer.step(5.0, 4, 3) == Step(Phase.DRAINING, 3)
    # window over, all of them still closing: nobody is left to tell
    assert drainer.step(10.0, 4, 0) == Step(Phase.DRAINING, 0)
    assert drainer.notified == 4


def test_window_zero_tells_everyone_at_once() -> None:
    drainer = Drainer(window_s=0.0, deadline_s=5.0)
    drainer.start(100.0, 7)
    assert drainer.step(100.0, 7, 7) == Step(Phase.DRAINING, 7)
    assert drainer.step(100.02, 7, 0) == Step(Phase.DRAINING, 0)  # told, still closing
    assert drainer.step(100.05, 0, 0) == Step(Phase.DRAINED, 0)
    assert drainer.notified == 7


def test_a_late_joiner_is_told_at_the_end_of_the_window() -> None:
    drainer = Drainer(window_s=2.0, deadline_s=10.0)
    drainer.start(0.0, 4)
    assert drainer.step(1.0, 4, 4).notify == 2
    # one joined, the two told are still closing: on schedule (3 of 4), not more
    assert drainer.step(1.5, 2 + 2 + 1, 2 + 1).notify == 1
    assert drainer.step(1.9, 3 + 2, 2).notify == 1  # the 4th of the 4 is due
    assert drainer.step(1.95, 4 + 1, 1).notify == 0  # the joiner waits for the window end
    assert drainer.step(2.0, 4 + 1, 1).notify == 1  # window over: everyone left is told
    assert drainer.step(2.05, 1 + 1, 1).notify == 1  # another joined after the window
    assert drainer.step(2.08, 1, 0) == Step(Phase.DRAINING, 0)
    assert drainer.step(2.1, 0, 0) == Step(Phase.DRAINED, 0)
    assert drainer.notified == 6  # 4 at the start and 2 late joiners, each told once


def test_connections_still_counted_are_not_asked_for_again() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=10.0)
    drainer.start(0.0, 2)
    assert drainer.step(1.0, 2, 2).notify == 2
    # both still closing at the next ticks, and a connection in its HTTP handshake
    assert drainer.step(1.05, 2, 0) == Step(Phase.DRAINING, 0)
    assert drainer.step(1.10, 3, 0) == Step(Phase.DRAINING, 0)
    assert drainer.notified == 2
    # the handshake became a peer: it alone is told
    assert drainer.step(1.20, 3, 1) == Step(Phase.DRAINING, 1)
    assert drainer.step(1.30, 3, 0) == Step(Phase.DRAINING, 0)
    assert drainer.notified == 3


def test_repeated_steps_after_the_window_never_over_count() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=100.0)
    drainer.start(0.0, 5)
    assert drainer.step(0.0, 5, 5).notify == 1
    assert drainer.step(2.0, 5, 4).notify == 4
    for i in range(500):  # five told peers that never finish closing
        assert drainer.step(2.0 + 0.01 * i, 5, 0) == Step(Phase.DRAINING, 0)
    assert drainer.notified == 5


# --- phases ----------------------------------------------------------------------------------
def test_stepping_before_start_does_nothing() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=2.0)
    assert drainer.step(50.0, 10, 10) == Step(Phase.SERVING, 0)
    assert drainer.step(51.0, 0, 0) == Step(Phase.SERVING, 0)
    assert drainer.phase is Phase.SERVING
    assert drainer.notified == 0
    assert not Step(Phase.SERVING, 0).finished
    assert not Step(Phase.DRAINING, 3).finished


def test_drained_when_the_last_connection_is_gone() -> None:
    drainer = Drainer(window_s=5.0, deadline_s=10.0)
    drainer.start(0.0, 2)
    assert drainer.step(0.0, 2, 2) == Step(Phase.DRAINING, 1)
    # the untold one left on its own; the told one is still closing: not drained yet
    assert drainer.step(0.1, 1, 0) == Step(Phase.DRAINING, 0)
    step = drainer.step(0.2, 0, 0)
    assert step == Step(Phase.DRAINED, 0)
    assert step.finished
    # terminal: nothing brings it back, not even new peers or the deadline
    assert drainer.step(20.0, 5, 5) == Step(Phase.DRAINED, 0)
    assert drainer.notified == 1


def test_a_handshake_in_flight_keeps_the_drain_open() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=10.0)
    drainer.start(0.0, 0)
    assert drainer.step(0.0, 1, 0) == Step(Phase.DRAINING, 0)
    assert drainer.step(2.0, 1, 0) == Step(Phase.DRAINING, 0)
    assert drainer.step(2.1, 0, 0) == Step(Phase.DRAINED, 0)
    assert drainer.notified == 0


def test_a_drain_of_nobody_is_drained_at_once() -> None:
    drainer = Drainer(window_s=5.0, deadline_s=10.0)
    drainer.start(0.0, 0)
    assert drainer.step(0.0, 0, 0) == Step(Phase.DRAINED, 0)


def test_expired_at_the_deadline() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=30.0)
    drainer.start(10.0, 3)
    assert drainer.step(11.0, 3, 3) == Step(Phase.DRAINING, 3)
    assert drainer.step(39.99, 3, 0) == Step(Phase.DRAINING, 0)  # told, but still closing
    step = drainer.step(40.0, 3, 0)
    assert step == Step(Phase.EXPIRED, 0)
    assert step.finished
    assert drainer.step(41.0, 0, 0) == Step(Phase.EXPIRED, 0)
    assert drainer.notified == 3


def test_the_expired_step_names_the_peers_never_told() -> None:
    drainer = Drainer(window_s=2.0, deadline_s=4.0)
    drainer.start(0.0, 4)
    assert drainer.step(1.0, 4, 4).notify == 2
    # the loop stalled past the deadline; one more peer joined meanwhile
    step = drainer.step(4.5, 2 + 3, 3)
    assert step == Step(Phase.EXPIRED, 3)
    assert step.finished
    assert drainer.notified == 5
    assert drainer.step(5.0, 5, 3) == Step(Phase.EXPIRED, 0)  # terminal: not asked again
    assert drainer.notified == 5


def test_peers_are_told_at_the_window_end_when_it_is_also_the_deadline() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=1.0)
    drainer.start(0.0, 10)
    assert drainer.step(0.5, 10, 10) == Step(Phase.DRAINING, 5)
    step = drainer.step(1.0, 10, 5)
    assert step == Step(Phase.EXPIRED, 5)  # the hint goes out before everyone is dropped
    assert step.finished
    assert drainer.notified == 10


def test_window_and_deadline_zero_tell_everyone_and_expire() -> None:
    drainer = Drainer(window_s=0.0, deadline_s=0.0)
    drainer.start(3.0, 4)
    assert drainer.step(3.0, 4, 4) == Step(Phase.EXPIRED, 4)
    assert drainer.notified == 4


def test_a_second_start_is_ignored() -> None:
    drainer = Drainer(window_s=10.0, deadline_s=20.0)
    drainer.start(0.0, 10)
    drainer.start(5.0, 1000)
    assert (drainer.started_at, drainer.total) == (0.0, 10)
    assert drainer.step(5.0, 10, 10).notify == 5  # paced on the first start's numbers


def test_a_deadline_shorter_than_the_window_is_refused() -> None:
    with pytest.raises(ValueError, match="deadline"):
        Drainer(window_s=5.0, deadline_s=4.9)
    Drainer(window_s=5.0, deadline_s=5.0)  # equal is allowed


# --- reconnect hints ---------------------------------------------------------------------------
def test_reconnect_hints_are_jittered_over_the_spread() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=2.0, spread_ms=1000, rng=random.Random(7))
    hints = [drainer.reconnect_after_ms() for _ in range(2000)]
    assert all(isinstance(h, int) and 0 <= h <= 1000 for h in hints)
    assert min(hints) < 50 and max(hints) > 950  # spread over the range, not clumped
    assert len(set(hints)) > 500
    again = Drainer(window_s=1.0, deadline_s=2.0, spread_ms=1000, rng=random.Random(7))
    assert [again.reconnect_after_ms() for _ in range(2000)] == hints  # seeded: repeatable


def test_no_spread_means_reconnect_at_once() -> None:
    drainer = Drainer(window_s=1.0, deadline_s=2.0, spread_ms=0, rng=random.Random(1))
    assert {drainer.reconnect_after_ms() for _ in range(20)} == {0}


# --- the property ------------------------------------------------------------------------------
# (seconds since the last tick, untold peers leaving, told peers done closing,
#  handshakes starting, handshakes becoming peers, handshakes failing)
events = st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(0, 30), st.integers(0, 30),
                            st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)),
                  max_size=40)


@given(peers=st.integers(0, 200), timing=st.tuples(st.floats(0.0, 20.0), st.floats(0.0, 30.0)),
       serving_ticks=st.integers(0, 3), events=events, start_at=st.floats(0.0, 1e6),
       linger=st.booleans(), handshaking=st.integers(0, 3))
@settings(deadline=None, max_examples=300)
def test_drain_invariants(*, peers: int, timing: tuple[float, float], serving_ticks: int,
                          events: list[tuple[float, int, int, int, int, int]],
                          start_at: float, linger: bool, handshaking: int) -> None:
    """Any ticks, departures, lingering closes, handshakes and late joins: each peer told
    at most once, on schedule before the window end and all of them from then on, phases
    move forward only, DRAINED/EXPIRED exactly for their reasons.

    ``timing`` is (window, deadline minus window).
    """
    window, slack = timing
    deadline = window + slack
    drainer = Drainer(window_s=window, deadline_s=deadline)
    worker = Worker(drainer, peers, linger=linger, handshaking=handshaking)
    ever = peers  # peers ever reported untold
    phases = []
    for i in range(serving_ticks):
        step = worker.tick(start_at - i)
        assert step == Step(Phase.SERVING, 0)
        phases.append(step.phase)
    drainer.start(start_at, peers)
    drainer.start(start_at + 1.0, peers + 99)  # ignored
    now = start_at
    for gap, leaving, closed, started, upgrading, failed in events:
        now += gap
        before = drainer.phase
        connected = worker.connected
        step = worker.tick(now)
        phases.append(step.phase)
        assert drainer.notified == worker.told <= ever
        elapsed = now - start_at
        if before is not Phase.DRAINING:
            assert step == Step(before, 0)  # terminal phases stay, and ask for nobody
        elif connected == 0:
            assert step == Step(Phase.DRAINED, 0)
        elif elapsed >= deadline:
            assert step.phase is Phase.EXPIRED
            assert worker.waiting == 0  # the expired step names everyone never told
        else:
            assert step.phase is Phase.DRAINING
            if elapsed >= window:
                assert worker.waiting == 0  # everyone there was told
            else:
                due = max(1, math.ceil(peers * elapsed / window))
                assert worker.told <= due  # never ahead of schedule
                assert worker.told >= due or worker.waiting == 0  # never behind it
        worker.waiting -= min(leaving, worker.waiting)
        worker.closed(closed)
        upgraded = min(upgrading, worker.handshaking)
        worker.handshaking -= upgraded
        worker.waiting += upgraded
        ever += upgraded
        worker.handshaking -= min(failed, worker.handshaking)
        worker.handshaking += started
    assert all(PHASE_ORDER[a] <= PHASE_ORDER[b] for a, b in itertools.pairwise(phases))
    assert all(a == b for a, b in itertools.pairwise(phases) if PHASE_ORDER[a] == 2)
    assert phases[:serving_ticks] == [Phase.SERVING] * serving_ticks
