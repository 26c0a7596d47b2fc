"""Full-jitter backoff: bounds, growth, floors and giving up (fake clock, seeded RNG)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.client.backoff import Backoff, BackoffPolicy


@given(seed=st.integers(0, 2**32), steps=st.integers(1, 40))
def test_each_delay_lies_within_the_full_jitter_ceiling(seed: int, steps: int) -> None:
    policy = BackoffPolicy(base_s=0.1, cap_s=5.0, give_up_after_s=1e9)
    backoff = Backoff(policy, random.Random(seed))
    backoff.lost(0.0)
    for n in range(steps):
        delay = backoff.next_delay(0.0)
        assert delay is not None
        assert 0.0 <= delay <= min(5.0, 0.1 * 2**n)


def test_delays_spread_over_the_window_rather_than_clustering() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=1.0)
    delays = []
    for seed in range(2000):
        backoff = Backoff(policy, random.Random(seed))
        backoff.lost(0.0)
        delay = backoff.next_delay(0.0)
        assert delay is not None
        delays.append(delay)
    quarters = [sum(1 for d in delays if q / 4 <= d < (q + 1) / 4) for q in range(4)]
    assert all(400 < count < 600 for count in quarters), quarters


def test_a_floor_from_the_relay_replaces_a_shorter_delay() -> None:
    backoff = Backoff(BackoffPolicy(base_s=0.01, cap_s=0.01), random.Random(1))
    backoff.lost(0.0)
    assert backoff.next_delay(0.0, at_least_s=1.37) == pytest.approx(1.37)


def test_gives_up_after_the_bound_and_never_sleeps_past_it() -> None:
    backoff = Backoff(BackoffPolicy(base_s=4.0, cap_s=8.0, give_up_after_s=10.0),
                      random.Random(3))
    backoff.lost(100.0)
    delay = backoff.next_delay(109.5, at_least_s=5.0)
    assert delay == pytest.approx(0.5)
    assert backoff.next_delay(110.0) is None


def test_success_resets_attempts_and_the_give_up_clock() -> None:
    backoff = Backoff(BackoffPolicy(base_s=1.0, cap_s=64.0, give_up_after_s=10.0),
                      random.Random(5))
    backoff.lost(0.0)
    for _ in range(5):
        backoff.next_delay(1.0)
    backoff.succeeded()
    assert backoff.attempts == 0
    backoff.lost(50.0)
    delay = backoff.next_delay(55.0)
    assert delay is not None and delay <= 1.0


@pytest.mark.parametrize("kwargs", [{"base_s": 0.0}, {"base_s": 2.0, "cap_s": 1.0},
                                    {"give_up_after_s": 0.0}])
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|needs"):
        BackoffPolicy(**kwargs)
