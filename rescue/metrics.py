"""Prometheus metrics of a relay node (prometheus-client in multiprocess mode).

``beach-rescue serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
this module is imported anywhere (:mod:`rescue.multiproc`); every process then
writes its values to memory-mapped files there, and ``/metrics`` on the admin listener
aggregates every live process. Workers never touch Prometheus on the hot path: they
count in plain integers (:class:`rescue.server.stats.WorkerStats`) and
:class:`StatsFolder` adds the differences to these metrics once a second. No label ever
carries a session or peer id.

The catalogue (type, labels, meaning) is documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from rescue.multiproc import MULTIPROC_ENV

ENV = MULTIPROC_ENV
P = "beach_rescue_"

# --- connections and sessions (gauges summed over live workers) -------------------------
WORKERS = Gauge(P + "workers", "Worker processes alive (each reports 1).",
                multiprocess_mode="livesum")
CONNECTIONS = Gauge(P + "connections", "Open WebSocket connections, handshakes included.",
                    multiprocess_mode="livesum")
PEERS = Gauge(P + "peers", "Peers joined to a session.", multiprocess_mode="livesum")
SESSIONS = Gauge(P + "sessions", "Sessions held, including empty ones in their grace period.",
                 multiprocess_mode="livesum")
DRAINING = Gauge(P + "drain_in_progress", "Workers draining right now.",
                 multiprocess_mode="livesum")
PAUSE = Gauge(P + "fallback_paused", "Kill switch as applied by the workers: 0 off, "
              "1 soft, 2 hard.", multiprocess_mode="livemax")

# --- intake ------------------------------------------------------------------------------
ACCEPTED = Counter(P + "connections_accepted", "TCP connections accepted by a worker.")
HANDOFFS = Counter(P + "handoffs", "Connections handed between workers.", ["event"])
HANDSHAKES = Counter(P + "handshakes", "Hello exchanges by outcome (ok, or the close code "
                     "that refused it).", ["outcome"])
UPGRADES_REFUSED = Counter(P + "upgrades_refused", "Upgrade requests refused before the "
                           "upgrade, by error code (token rejections included).", ["error"])

# --- traffic -------------------------------------------------------------------------------
MESSAGES = Counter(P + "messages_forwarded", "Messages written to receivers, by frame kind "
                   "(one per receiver).", ["kind"])
BYTES = Counter(P + "bytes_forwarded", "Bytes written to receivers, by frame kind.", ["kind"])
HEARTBEATS = Counter(P + "heartbeats_answered", "Heartbeat frames answered by the relay.")
UNROUTED = Counter(P + "frames_unrouted", "Frames that arrived while no counterpart was "
                   "connected (the sender was told by peer events).")
MESSAGE_SIZE = Histogram(P + "message_size_bytes", "Size of relayed messages (sampled 1 in "
                         "64, telemetry opt-in peers only).",
                         buckets=(64, 256, 1024, 4096, 16384, 65544))
FORWARD_SECONDS = Histogram(P + "forward_seconds", "Relay time from a message read to its "
                            "last receiver write (sampled 1 in 64, telemetry opt-in peers "
                            "only).", buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2))
SESSION_SECONDS = Histogram(P + "session_duration_seconds", "Lifetime of sessions, observed "
                            "when their state is dropped.",
                            buckets=(10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))

# --- flow control, limits, liveness, closes ------------------------------------------------
FLOW_PAUSES = Counter(P + "flow_pauses", "Times a sender was held because a receiver was "
                      "over its high-water mark.")
SLOW_EVICTIONS = Counter(P + "slow_consumer_evictions", "Receivers closed with 4005.")
RATE_LIMITED = Counter(P + "rate_limited", "Connections closed with 4007.")
IDLE_CLOSES = Counter(P + "idle_closes", "Connections closed with 4006.")
HEADER_TIMEOUTS = Counter(P + "request_timeouts", "Connections closed for not sending a "
                          "complete request in time.", ["stage"])
CLOSES = Counter(P + "closes", "Connections closed by the relay, by close reason.", ["reason"])

# --- drains and the supervisor -----------------------------------------------------------
DRAIN_NOTIFIED = Counter(P + "drain_peers_notified", "Peers told `draining` and closed 1012.")
DRAINS = Counter(P + "drains", "Worker drains finished, by result.", ["result"])
WORKER_RESTARTS = Counter(P + "worker_restarts", "Workers restarted after dying unasked.",
                          ["slot"])
RELOADS = Counter(P + "reloads", "SIGHUP reloads, by result.", ["result"])
WORKER_CPU = Counter(P + "worker_cpu_seconds", "CPU time used by workers (user + system).")

# --- control plane -----------------------------------------------------------------------
TOKEN_REQUESTS = Counter(P + "token_requests", "Token API requests by outcome (issued, or "
                         "the error code).", ["outcome"])
TOKENS_ISSUED = Counter(P + "fallback_tokens_issued", "Fallback tokens issued, by guardrail "
                        "state.", ["guardrail"])
SESSIONS_COUNTED = Counter(P + "sessions_counted", "Sessions reported through /v1/sessions.")
SOFT_BREACHES = Counter(P + "guardrail_soft_breaches", "Cohort-hours that crossed the soft "
                        "threshold (counted once per cohort-hour and process).")
STORE_ERRORS = Counter(P + "store_errors", "Store (Redis) operations that failed.")
REGISTRY_ERRORS = Counter(P + "registry_errors", "Node registry (Redis) refreshes that "
                          "failed.")

_FILE_HEADER_BYTES = 8
PAUSE_VALUES = {"off": 0, "soft": 1, "hard": 2}


def mark_dead(pid: int) -> None:
    """Drop a reaped worker's live gauges (only in multiprocess mode)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class SizedFilesCollector(multiprocess.MultiProcessCollector):
    """The multiprocess collector, skipping files a starting process has not sized yet.

    prometheus-client creates a process's file empty and then grows it; a scrape that
    reads it in between would fail on the empty file. Such a file holds no value yet.
    """

    def collect(self) -> Any:
        """Merge every ``*.db`` file that has at least its 8-byte header."""
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) >= _FILE_HEADER_BYTES:
                    files.append(path)
            except FileNotFoundError:  # a live gauge file of a process just reaped
                continue
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The text exposition of every live process's metrics (or this process's alone)."""
    if os.environ.get(ENV):
        registry = CollectorRegistry()
        SizedFilesCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


class StatsFolder:
    """Adds the growth of plain counters to Prometheus counters, once per call."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def add(self, counter: Any, value: float, label: str | None = None) -> None:
        """Increase ``counter`` (with ``label``) by how much ``value`` grew since last time."""
        key = (counter._name, label or "")
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            (counter.labels(label) if label is not None else counter).inc(delta)
        self._last[key] = value

    def add_all(self, counter: Any, values: Mapping[str, float]) -> None:
        """:meth:`add` for every label of a mapping of label → value."""
        for label, value in values.items():
            self.add(counter, value, label)
