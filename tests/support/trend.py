"""A least-squares line through samples, to tell a leak from noise in a soak test.

A soak samples a quantity (a worker's RSS, its open file descriptors) at intervals while
the traffic is steady; a leak shows as a positive slope. :func:`fit_line` is the ordinary
least-squares fit of ``value = slope * t + intercept``; :attr:`Line.per_minute` states the
slope in units per minute, which is how the soak's bounds are written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Line:
    """A fitted line: ``value = slope * t + intercept`` (``t`` in seconds)."""

    slope: float  # units per second
    intercept: float
    samples: int
    span_s: float  # last t minus first t

    @property
    def per_minute(self) -> float:
        """The slope in units per minute."""
        return self.slope * 60.0

    def at(self, t: float) -> float:
        """The fitted value at ``t``."""
        return self.slope * t + self.intercept


def fit_line(times: Sequence[float], values: Sequence[float]) -> Line:
    """The least-squares line through ``(times[i], values[i])``.

    Needs at least two samples at two distinct times (ValueError otherwise) and finite
    numbers (ValueError for NaN or infinity).
    """
    if len(times) != len(values):
        raise ValueError(f"{len(times)} times but {len(values)} values")
    if len(times) < 2:
        raise ValueError("a line needs at least two samples")
    if not all(math.isfinite(x) for x in (*times, *values)):
        raise ValueError("samples must be finite numbers")
    n = len(times)
    mean_t = math.fsum(times) / n
    mean_v = math.fsum(values) / n
    spread = math.fsum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        raise ValueError("every sample has the same time: no slope can be fitted")
    covariance = math.fsum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True))
    slope = covariance / spread
    return Line(slope=slope, intercept=mean_v - slope * mean_t, samples=n,
                span_s=max(times) - min(times))
