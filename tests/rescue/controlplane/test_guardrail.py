"""The guardrail's sans-I/O parts: hour buckets, counter keys, the decision, the breach log."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.controlplane.guardrail import (
    COUNTER_TTL_S,
    KEY_PREFIX,
    BreachLog,
    counter_keys,
    evaluate,
    hour_bucket,
)


def utc(stamp: str) -> float:
    """Unix time of a UTC wall-clock instant written ``YYYY-MM-DDTHH:MM:SS[.fff]``."""
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()


def test_hour_bucket_is_the_utc_hour() -> None:
    assert hour_bucket(0.0) == "1970-01-01-00"
    assert hour_bucket(utc("2024-02-29T23:59:59.999")) == "2024-02-29-23"
    assert hour_bucket(utc("2024-03-01T00:00:00")) == "2024-03-01-00"


def test_hour_boundary_changes_the_bucket_exactly_on_the_hour() -> None:
    start = utc("2025-06-01T10:00:00")
    assert hour_bucket(start - 0.001) == "2025-06-01-09"
    assert hour_bucket(start) == "2025-06-01-10"
    assert hour_bucket(start + 3599.999) == "2025-06-01-10"
    assert hour_bucket(start + 3600) == "2025-06-01-11"


def test_counter_keys_name_cohort_and_hour() -> None:
    now = utc("2025-01-02T03:04:05")
    fallback, total = counter_keys("beta", now)
    assert fallback == f"{KEY_PREFIX}:beta:2025-01-02-03:fallback"
    assert total == f"{KEY_PREFIX}:beta:2025-01-02-03:total"
    # Another cohort, or the next hour, never shares a key.
    assert not {fallback, total} & set(counter_keys("public", now))
    assert not {fallback, total} & set(counter_keys("beta", now + 3600))
    assert counter_keys("beta", now) == counter_keys("beta", utc("2025-01-02T03:59:59"))


def test_counter_ttl_outlives_its_hour_but_not_by_much() -> None:
    assert 3600 < COUNTER_TTL_S <= 5400


def test_ratio_under_threshold_is_no_breach() -> None:
    state = evaluate(1, 1000, threshold=0.005)
    assert state.ratio == pytest.approx(0.001)
    assert (state.soft_breach, state.hard_breach) == (False, False)
    assert (state.fallback, state.total) == (1, 1000)


def test_ratio_at_threshold_is_a_soft_breach() -> None:
    assert evaluate(4, 1000, threshold=0.005).soft_breach is False
    at = evaluate(5, 1000, threshold=0.005)
    assert at.soft_breach is True
    assert at.ratio == pytest.approx(0.005)
    assert at.hard_breach is False  # hard threshold off by default


def test_no_session_counted_counts_as_one_session() -> None:
    state = evaluate(1, 0, threshold=0.005)
    assert state.ratio == 1.0
    assert state.soft_breach is True


def test_hard_threshold_zero_disables_the_hard_breach() -> None:
    assert evaluate(1000, 1, threshold=0.005, hard_threshold=0.0).hard_breach is False


def test_hard_threshold_trips_at_or_over_it() -> None:
    assert evaluate(4, 10, threshold=0.1, hard_threshold=0.5).hard_breach is False
    assert evaluate(5, 10, threshold=0.1, hard_threshold=0.5).hard_breach is True
    assert evaluate(9, 10, threshold=0.1, hard_threshold=0.5).hard_breach is True


@given(fallback=st.integers(0, 10**9), total=st.integers(0, 10**9),
       threshold=st.floats(1e-6, 1.0), hard=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
       minimum=st.integers(1, 1000))
def test_decision_is_the_ratio_against_the_thresholds(fallback: int, total: int,
                                                      threshold: float, hard: float,
                                                      minimum: int) -> None:
    state = evaluate(fallback, total, threshold=threshold, hard_threshold=hard,
                     hard_min_sessions=minimum)
    ratio = fallback / max(total, 1)
    assert state.ratio == ratio
    assert state.soft_breach == (ratio >= threshold)
    assert state.hard_breach == (hard > 0 and total >= minimum and ratio >= hard)


def test_a_cohort_below_the_minimum_sample_never_breaches_hard() -> None:
    assert evaluate(1, 0, threshold=0.1, hard_threshold=0.5).hard_breach is False
    assert evaluate(50, 99, threshold=0.1, hard_threshold=0.5,
                    hard_min_sessions=100).hard_breach is False
    assert evaluate(50, 100, threshold=0.1, hard_threshold=0.5,
                    hard_min_sessions=100).hard_breach is True


def test_breach_log_fires_once_per_cohort_hour() -> None:
    log = BreachLog()
    hour = utc("2025-06-01T10:00:00")
    assert log.first("public", hour + 1) is True
    assert log.first("public", hour + 1800) is False
    assert log.first("public", hour + 3599) is False
    assert log.first("beta", hour + 5) is True  # another cohort
    assert log.first("public", hour + 3600) is True  # the next hour
    assert log.first("public", hour + 3601) is False


def test_breach_log_is_bounded_and_forgets_the_oldest() -> None:
    log = BreachLog(capacity=3)
    now = utc("2025-06-01T10:00:00")
    for cohort in ("a", "b", "c", "d"):
        assert log.first(cohort, now) is True
    assert log.first("d", now) is False
    assert log.first("b", now) is False
    # "a" was the oldest and was dropped to keep at most 3 entries: it reports again.
    assert log.first("a", now) is True
