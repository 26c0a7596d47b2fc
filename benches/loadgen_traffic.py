"""Traffic pieces of a generator process: the send schedule, its health, per-flow accounting.

:class:`RateWheel` spreads the sends of many peers evenly over a period (a timing wheel driven
by one ticker), so the relay sees a steady stream instead of bursts, and records how late each
slot fired. :class:`LoopLagProbe` measures how late the event loop wakes a sleeper. Both say
whether the generator kept its schedule: a late generator offers bursts and adds its own delay
to every latency it measures. :class:`Flow` counts the frames of one direction inside the
measured window and keeps their latencies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic_ns
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


NEVER = 1 << 62
"""A window edge that has not been set (later than any ``monotonic_ns``)."""


class RateWheel:
    """Calls ``action(item)`` for every added item once per ``period_ns``, phases spread evenly.

    ``late_us`` holds, for every non-empty slot run while ``record`` was asked for, how late it
    ran after its due time (microseconds): the generator's schedule lag.
    """

    def __init__(self, period_ns: int, tick_ns: int, action: Callable[[Any], None]) -> None:
        self.slots_n = max(1, min(1000, round(period_ns / tick_ns)))
        self.step_ns = period_ns / self.slots_n
        self.slots: list[list[Any]] = [[] for _ in range(self.slots_n)]
        self.action = action
        self.added = 0
        self.next_slot = 0
        self.next_due = -1.0
        self.late_us = Histogram()

    def add(self, item: Any) -> None:
        """Schedule ``item`` in the slot a golden-ratio sequence picks, so any number of items
        spreads evenly over the period."""
        spread = (self.added * 0.6180339887498949) % 1.0
        self.slots[int(spread * self.slots_n)].append(item)
        self.added += 1

    def run_due(self, now: int, record: bool = False) -> None:
        """Run every slot whose time has come (catching up after a stall keeps the rate);
        with ``record``, note how late each non-empty slot ran in ``late_us``."""
        if self.next_due < 0:
            self.next_due = now
        while self.next_due <= now:
            slot = self.slots[self.next_slot]
            if slot:
                if record:
                    self.late_us.record(int(now - self.next_due) // 1000)
                for item in slot:
                    self.action(item)
            self.next_slot = (self.next_slot + 1) % self.slots_n
            self.next_due += self.step_ns


class LoopLagProbe:
    """Measures how late the event loop wakes a ``interval_s`` sleep; keeps the samples whose
    sleep lay inside the window ``[t0, t1)`` (``monotonic_ns``) in ``lag_us``."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.t0 = NEVER
        self.t1 = NEVER
        self.running = True
        self.lag_us = Histogram()

    async def run(self) -> None:
        """Sleep and measure until ``running`` is cleared (or the task is cancelled)."""
        interval_ns = int(self.interval_s * 1e9)
        while self.running:
            start = monotonic_ns()
            await asyncio.sleep(self.interval_s)
            end = monotonic_ns()
            if self.t0 <= start and end < self.t1:
                self.lag_us.record(max(0, end - start - interval_ns) // 1000)
