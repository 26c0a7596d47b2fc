"""Once a second, a worker's plain counters become Prometheus values (off the hot path)."""

from __future__ import annotations

import os
from typing import Any

from rescue import metrics
from rescue.frames import Kind
from rescue.server.relay import Relay

_KIND_NAMES = [k.name.lower() for k in sorted(Kind)]


class WorkerExport:
    """Folds one worker's :class:`~rescue.server.stats.WorkerStats` into the metrics."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.folder = metrics.StatsFolder()

    def fold(self, intake: Any = None) -> None:
        """Publish gauges and add the counters' growth since the previous call."""
        relay, add = self.relay, self.folder.add
        stats = relay.stats
        metrics.WORKERS.set(1)
        metrics.CONNECTIONS.set(relay.connections)
        metrics.PEERS.set(len(relay.peers))
        metrics.SESSIONS.set(len(relay.registry))
        metrics.DRAINING.set(1 if relay.draining else 0)
        metrics.PAUSE.set(metrics.PAUSE_VALUES[relay.pause.value])
        for kind, name in enumerate(_KIND_NAMES):
            add(metrics.MESSAGES, stats.kind_messages[kind], name)
            add(metrics.BYTES, stats.kind_bytes[kind], name)
        add(metrics.HEARTBEATS, stats.heartbeats_answered)
        add(metrics.UNROUTED, stats.frames_unrouted)
        add(metrics.FLOW_PAUSES, stats.flow_pauses)
        add(metrics.SLOW_EVICTIONS, stats.slow_consumer_evictions)
        add(metrics.RATE_LIMITED, stats.rate_limited)
        add(metrics.IDLE_CLOSES, stats.idle_closes)
        add(metrics.HEADER_TIMEOUTS, stats.header_timeouts, "headers")
        add(metrics.HANDSHAKES, stats.handshakes_ok, "ok")
        add(metrics.DRAIN_NOTIFIED, stats.drain_notified)
        self.folder.add_all(metrics.HANDSHAKES, {
            k: v for k, v in stats.handshake_refusals.items()})
        self.folder.add_all(metrics.UPGRADES_REFUSED, stats.upgrades_refused)
        self.folder.add_all(metrics.CLOSES, stats.closes)
        for size, seconds in stats.samples:
            metrics.MESSAGE_SIZE.observe(size)
            metrics.FORWARD_SECONDS.observe(seconds)
        stats.samples.clear()
        for age in stats.session_ages:
            metrics.SESSION_SECONDS.observe(age)
        stats.session_ages.clear()
        if intake is not None:
            add(metrics.ACCEPTED, intake.accepted)
            add(metrics.HANDOFFS, intake.handed_off, "out")
            add(metrics.HANDOFFS, intake.adopted, "in")
            add(metrics.HANDOFFS, intake.handoff_failures, "failed")
            add(metrics.HANDOFFS, intake.handoffs_expired, "expired")
            add(metrics.HANDOFFS, intake.handoff_retries, "retried")
            add(metrics.HEADER_TIMEOUTS, intake.peek_timeouts, "request_line")
        times = os.times()
        add(metrics.WORKER_CPU, times.user + times.system)
