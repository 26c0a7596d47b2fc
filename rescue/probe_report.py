"""The results of ``beach-rescue probe`` (rescue/probe.py) and their reports.

A :class:`ProbeResult` holds what one run found: its outcome (the failed step, reason and
exit code), frame counts and latency samples in seconds. This module turns it into the
JSON document of ``--json``, the human summary, and Prometheus gauges labelled with the
target: a registry for a Pushgateway's text, or a file for node_exporter's textfile
collector, written atomically (temp file + rename). Latency samples are summarized as
count, min, mean, nearest-rank quantiles and max.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, Metric


class LatencyStats(msgspec.Struct, frozen=True):
    """Latency samples in seconds: count, min, mean, nearest-rank quantiles, max."""

    count: int
    min: float
    avg: float
    p50: float
    p90: float
    p99: float
    max: float


def summarize(samples: Sequence[float]) -> LatencyStats | None:
    """Return the summary of ``samples`` (seconds), or None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return LatencyStats(count=len(ordered), min=ordered[0],
                        avg=math.fsum(ordered) / len(ordered), p50=rank(0.5), p90=rank(0.9),
                        p99=rank(0.99), max=ordered[-1])


class ProbeResult(msgspec.Struct):
    """What one run found; ``ok`` is true exactly when ``step`` and ``reason`` are None.

    ``target`` is the relay URL without query or credentials; latencies are in seconds;
    ``exit_code`` is the exit status of the run (0: success; rescue.probe names the others).
    """

    target: str
    session_id: str
    started_at: float
    ok: bool = False
    step: str | None = None
    reason: str | None = None
    exit_code: int = 0
    duration_s: float = 0.0
    frames_sent: int = 0
    frames_received: int = 0
    rtt_s: list[float] = msgspec.field(default_factory=list)
    host_to_participant_s: list[float] = msgspec.field(default_factory=list)
    participant_to_host_s: list[float] = msgspec.field(default_factory=list)
    host_connection_id: str | None = None
    participant_connection_id: str | None = None


def report(result: ProbeResult) -> dict[str, Any]:
    """Return the JSON document of ``--json``: outcome, target, counts and latency stats."""
    return {
        "ok": result.ok, "step": result.step, "reason": result.reason,
        "exit_code": result.exit_code, "target": result.target,
        "session_id": result.session_id, "started_at": round(result.started_at, 3),
        "duration_s": round(result.duration_s, 6),
        "frames": {"sent": result.frames_sent, "received": result.frames_received},
        "rtt_s": summarize(result.rtt_s),
        "one_way_s": {"host_to_participant": summarize(result.host_to_participant_s),
                      "participant_to_host": summarize(result.participant_to_host_s)},
        "connection_ids": {"host": result.host_connection_id,
                           "participant": result.participant_connection_id},
    }


def failure_line(result: ProbeResult) -> str:
    """Return ``probe failed at <step>: <reason>`` (or ``probe ok``)."""
    return "probe ok" if result.ok else f"probe failed at {result.step}: {result.reason}"


def format_summary(result: ProbeResult) -> str:
    """Return the human summary of a run, one fact per line."""
    lines = [f"{failure_line(result)}: {result.target} session {result.session_id}",
             f"  frames: {result.frames_sent} sent, {result.frames_received} received "
             "byte-exact and in order"]
    for label, samples in (("rtt (heartbeat)", result.rtt_s),
                           ("one-way host->participant", result.host_to_participant_s),
                           ("one-way participant->host", result.participant_to_host_s)):
        if (stats := summarize(samples)) is not None:
            lines.append(f"  {label}, {stats.count} samples: min {stats.min * 1e3:.3f} ms, "
                         f"avg {stats.avg * 1e3:.3f} ms, p90 {stats.p90 * 1e3:.3f} ms, "
                         f"max {stats.max * 1e3:.3f} ms")
    lines.append(f"  duration: {result.duration_s * 1e3:.1f} ms")
    return "\n".join(lines)


def _quantiles(stats: LatencyStats) -> tuple[tuple[str, float], ...]:
    return (("0", stats.min), ("0.5", stats.p50), ("0.9", stats.p90), ("0.99", stats.p99),
            ("1", stats.max))


class _ResultCollector:
    """Exposes one :class:`ProbeResult` as gauges, each labelled with the target."""

    def __init__(self, result: ProbeResult) -> None:
        self.result = result

    def collect(self) -> Iterable[Metric]:
        r = self.result

        def family(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"beach_rescue_probe_{name}", doc,
                                     labels=["target", *labels])

        rtt = summarize(r.rtt_s)
        for name, doc, value in (
                ("success", "1 if the last probe succeeded, else 0.", float(r.ok)),
                ("duration_seconds", "Wall time of the last probe.", r.duration_s),
                ("last_run_timestamp_seconds", "Unix time the last probe finished.",
                 r.started_at + r.duration_s),
                ("exit_code", "Exit status of the last probe (0: success).", r.exit_code),
                ("rtt_avg_seconds", "Mean heartbeat round trip.", rtt.avg if rtt else None)):
            if value is not None:
                gauge = family(name, doc)
                gauge.add_metric([r.target], value)
                yield gauge
        if not r.ok:
            failed = family("failure_step", "Info: the step the last probe failed at.",
                            "step", "exit_code")
            failed.add_metric([r.target, r.step or "", str(r.exit_code)], 1.0)
            yield failed
        rtt_family = family("rtt_seconds", "Heartbeat round trip through the relay "
                            "(quantile 0: minimum, 1: maximum).", "quantile")
        for quantile, value in _quantiles(rtt) if rtt else ():
            rtt_family.add_metric([r.target, quantile], value)
        one_way = family("one_way_seconds", "One-way latency of data frames through the "
                         "relay (quantile 0: minimum, 1: maximum).", "direction", "quantile")
        for direction, samples in (("host_to_participant", r.host_to_participant_s),
                                   ("participant_to_host", r.participant_to_host_s)):
            stats = summarize(samples)
            for quantile, value in _quantiles(stats) if stats else ():
                one_way.add_metric([r.target, direction, quantile], value)
        yield from (f for f in (rtt_family, one_way) if f.samples)


def metrics_registry(result: ProbeResult) -> CollectorRegistry:
    """Return a fresh registry (not the global one) holding the metrics of ``result``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ResultCollector(result))
    return registry


def write_metrics_file(result: ProbeResult, path: Path) -> None:
    """Write ``result`` as a Prometheus text file, atomically (temp file, then rename)."""
    write_to_textfile(str(path), metrics_registry(result))
