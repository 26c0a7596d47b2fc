"""Traffic pieces of a generator process: the send schedule and the per-flow accounting.

:class:`RateWheel` spreads the sends of many peers evenly over a period (a timing wheel driven
by one ticker), so the relay sees a steady stream instead of bursts. :class:`Flow` counts the
frames of one direction inside the measured window and keeps their latencies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latency_histogram import Histogram


@dataclass
class Flow:
    """Counters of one direction of traffic (or of heartbeats) inside the measured window."""

    sent_in_window: int = 0
    delivered_in_window: int = 0
    received_in_window: int = 0
    received_total: int = 0
    seq_gaps: int = 0
    latency_us: Histogram = field(default_factory=Histogram)

    def to_json(self) -> dict[str, Any]:
        """Return the counters and the latency histogram as JSON-ready data."""
        return {"sent_in_window": self.sent_in_window,
                "delivered_in_window": self.delivered_in_window,
                "received_in_window": self.received_in_window,
                "received_total": self.received_total, "seq_gaps": self.seq_gaps,
                "latency_us": self.latency_us.to_json()}


class RateWheel:
    """Calls ``action(item)`` for every added item once per ``period_ns``, phases spread evenly."""

    def __init__(self, period_ns: int, tick_ns: int, action: Callable[[Any], None]) -> None:
        self.slots_n = max(1, min(1000, round(period_ns / tick_ns)))
        self.step_ns = period_ns / self.slots_n
        self.slots: list[list[Any]] = [[] for _ in range(self.slots_n)]
        self.action = action
        self.added = 0
        self.next_slot = 0
        self.next_due = -1.0

    def add(self, item: Any) -> None:
        """Schedule ``item`` in the slot a golden-ratio sequence picks, so any number of items
        spreads evenly over the period."""
        spread = (self.added * 0.6180339887498949) % 1.0
        self.slots[int(spread * self.slots_n)].append(item)
        self.added += 1

    def run_due(self, now: int) -> None:
        """Run every slot whose time has come (catching up after a stall keeps the rate)."""
        if self.next_due < 0:
            self.next_due = now
        while self.next_due <= now:
            for item in self.slots[self.next_slot]:
                self.action(item)
            self.next_slot = (self.next_slot + 1) % self.slots_n
            self.next_due += self.step_ns
