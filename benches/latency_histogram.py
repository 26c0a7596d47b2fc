"""A mergeable log-linear histogram of non-negative integers (the benches record microseconds).

Values below 128 have a bucket each; above, every power-of-two range is split into 64 equal
buckets, so a reported percentile is at most ~1.6 % above the true value (we report a bucket's
upper bound: conservative). Count, sum, min and max are kept exactly. Generator processes
ship :meth:`to_json` to the parent, which merges them with :meth:`merge`.
"""

from __future__ import annotations

from typing import Any

_EXACT = 128
_HALF = 64


def bucket_of(value: int) -> int:
    """Return the bucket index of ``value`` (negative values count as 0)."""
    if value < _EXACT:
        return value if value > 0 else 0
    shift = value.bit_length() - 7
    return _EXACT + (shift - 1) * _HALF + ((value >> shift) - _HALF)


def bucket_upper(index: int) -> int:
    """Return the largest value that falls into bucket ``index``."""
    if index < _EXACT:
        return index
    shift = (index - _EXACT) // _HALF + 1
    mantissa = (index - _EXACT) % _HALF + _HALF
    return ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of integer samples in fixed buckets; percentiles within ~1.6 %."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0
        self.min = -1

    def record(self, value: int) -> None:
        """Add one sample."""
        value = max(value, 0)
        index = bucket_of(value)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        if self.min < 0 or value < self.min:
            self.min = value

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other`` to this histogram."""
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min >= 0 and (self.min < 0 or other.min < self.min):
            self.min = other.min

    def percentile(self, q: float) -> int | None:
        """Return the value at quantile ``q`` (0..100), or None without samples."""
        if self.count == 0:
            return None
        rank = max(1, round(q / 100.0 * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_upper(index), self.max)
        return self.max

    def summary(self, scale: float = 1.0) -> dict[str, float | int | None]:
        """Return count, mean, p50/p95/p99/max (and min), each value divided by ``scale``."""

        def scaled(v: int | None) -> float | None:
            return None if v is None else round(v / scale, 3)

        return {
            "count": self.count,
            "mean": None if self.count == 0 else round(self.total / self.count / scale, 3),
            "min": scaled(self.min if self.min >= 0 else None),
            "p50": scaled(self.percentile(50)),
            "p95": scaled(self.percentile(95)),
            "p99": scaled(self.percentile(99)),
            "max": scaled(self.max if self.count else None),
        }

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable form that :meth:`from_json` reads back."""
        return {"counts": {str(k): v for k, v in self.counts.items()}, "count": self.count,
                "total": self.total, "max": self.max, "min": self.min}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        """Rebuild a histogram written by :meth:`to_json`."""
        h = cls()
        h.counts = {int(k): int(v) for k, v in data["counts"].items()}
        h.count = int(data["count"])
        h.total = int(data["total"])
        h.max = int(data["max"])
        h.min = int(data["min"])
        return h
