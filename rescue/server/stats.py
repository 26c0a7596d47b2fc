"""Process-local counters of one worker: plain integers, cheap on the hot path."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class WorkerStats:
    """Counters a worker keeps; exported by ``/debug/stats`` (and later, metrics)."""

    upgrades_refused: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    handshakes_ok: int = 0
    messages_forwarded: int = 0
    bytes_forwarded: int = 0
    heartbeats_answered: int = 0
    frames_unrouted: int = 0
    frames_to_closing: int = 0
    flow_pauses: int = 0
    slow_consumer_evictions: int = 0
    rate_limited: int = 0
    idle_closes: int = 0
    header_timeouts: int = 0
    sessions_expired: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Counter) else value
        return out
