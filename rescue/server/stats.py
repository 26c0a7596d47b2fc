"""Process-local counters of one worker: plain integers, cheap on the hot path."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class WorkerStats:
    """Counters a worker keeps; exported by ``/debug/stats`` and folded into metrics."""

    upgrades_refused: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    handshake_refusals: Counter[str] = field(default_factory=Counter)
    handshakes_ok: int = 0
    # Indexed by frame kind (0 control .. 4 ack): messages / bytes written to receivers.
    kind_messages: list[int] = field(default_factory=lambda: [0] * 5)
    kind_bytes: list[int] = field(default_factory=lambda: [0] * 5)
    # (size, seconds from read to last write) of 1 in 64 messages of opted-in peers.
    samples: list[tuple[int, float]] = field(default_factory=list)
    session_ages: list[float] = field(default_factory=list)  # of sessions just dropped
    heartbeats_answered: int = 0
    frames_unrouted: int = 0
    frames_to_closing: int = 0
    flow_pauses: int = 0
    slow_consumer_evictions: int = 0
    rate_limited: int = 0
    idle_closes: int = 0
    header_timeouts: int = 0
    sessions_expired: int = 0
    drain_notified: int = 0

    @property
    def messages_forwarded(self) -> int:
        return sum(self.kind_messages)

    @property
    def bytes_forwarded(self) -> int:
        return sum(self.kind_bytes)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("samples", "session_ages"):
                continue
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Counter) else value
        out["messages_forwarded"] = self.messages_forwarded
        out["bytes_forwarded"] = self.bytes_forwarded
        return out
