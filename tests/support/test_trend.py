"""The least-squares fit of tests/support/trend.py: exact lines, noise, refusals."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.trend import fit_line

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_a_flat_series_has_zero_slope() -> None:
    line = fit_line([0, 1, 2, 3], [5.0, 5.0, 5.0, 5.0])
    assert (line.slope, line.intercept, line.samples, line.span_s) == (0.0, 5.0, 4, 3)


def test_slope_per_minute_of_a_known_line() -> None:
    times = [0.0, 10.0, 20.0, 30.0]
    line = fit_line(times, [100 + 0.5 * t for t in times])  # 0.5 per second
    assert line.slope == pytest.approx(0.5)
    assert line.per_minute == pytest.approx(30.0)
    assert line.at(40.0) == pytest.approx(120.0)


def test_symmetric_noise_does_not_tilt_the_line() -> None:
    # A sawtooth around a flat level: the least-squares slope of a balanced pattern is 0.
    times = list(range(12))
    values = [1000 + (8 if i % 2 else -8) for i in times]
    assert abs(fit_line(times, values).slope) < 1.5  # one period's bias at most


def test_a_leak_stands_out_from_noise() -> None:
    rng = random.Random(7)
    times = [float(t) for t in range(0, 600, 5)]
    leaky = [50e6 + 1000 * t + rng.gauss(0, 200_000) for t in times]
    flat = [50e6 + rng.gauss(0, 200_000) for _ in times]
    assert fit_line(times, leaky).per_minute == pytest.approx(60_000, rel=0.1)
    assert abs(fit_line(times, flat).per_minute) < 10_000


# Sample times are clock readings: whole milliseconds (two times 1e-304 s apart are one time).
@given(slope=finite, intercept=finite,
       times=st.lists(st.integers(min_value=0, max_value=100_000_000), min_size=2,
                      max_size=50, unique=True).map(lambda ms: [m / 1000 for m in ms]))
def test_points_on_a_line_give_that_line_back(slope: float, intercept: float,
                                              times: list[float]) -> None:
    line = fit_line(times, [slope * t + intercept for t in times])
    scale = max(1.0, abs(slope) * max(times) + abs(intercept))
    for t in times:  # compare the fitted values: robust where times bunch together
        assert line.at(t) == pytest.approx(slope * t + intercept, abs=1e-6 * scale)


def test_order_of_samples_does_not_matter() -> None:
    times, values = [3.0, 0.0, 2.0, 1.0], [7.0, 1.0, 4.0, 3.0]
    ordered = sorted(zip(times, values, strict=True))
    a = fit_line(times, values)
    b = fit_line([t for t, _ in ordered], [v for _, v in ordered])
    assert a.slope == pytest.approx(b.slope) and a.intercept == pytest.approx(b.intercept)


@pytest.mark.parametrize(("times", "values", "message"), [
    ([1.0], [2.0], "at least two"),
    ([1.0, 1.0], [2.0, 3.0], "same time"),
    ([1.0, 2.0], [2.0], "times but"),
    ([1.0, 2.0], [float("nan"), 1.0], "finite"),
])
def test_unfittable_samples_are_refused(times: list[float], values: list[float],
                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_line(times, values)
