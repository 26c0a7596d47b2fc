"""Tests for rescue/probe_report.py: latency summaries, the ``--json`` document, the human
summary and the Prometheus metrics of a probe result, built from synthetic results."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rescue import probe_report
from rescue.probe_report import ProbeResult


def metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse Prometheus text into {family name: [(labels, value)]}; names must be unique."""
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), f"duplicate metric families: {types}"
    return {family.name: [(s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def passed() -> ProbeResult:
    return ProbeResult(target="ws://r/ws", session_id="probe-y", started_at=100.0004, ok=True,
                       duration_s=0.25, frames_sent=4, frames_received=4,
                       rtt_s=[0.002, 0.001], host_to_participant_s=[0.003, 0.001],
                       participant_to_host_s=[0.004, 0.002], host_connection_id="c-h",
                       participant_connection_id="c-p")


def failed() -> ProbeResult:
    return ProbeResult(target="ws://r/ws", session_id="probe-x", started_at=100.0,
                       step="relay", reason="frame 3 lost", exit_code=6, duration_s=2.5,
                       rtt_s=[0.001])


def test_summarize_uses_nearest_rank_quantiles() -> None:
    stats = probe_report.summarize([i / 1000 for i in range(100, 0, -1)])
    assert stats is not None
    assert (stats.count, stats.min, stats.max) == (100, 0.001, 0.1)
    assert (stats.p50, stats.p90, stats.p99) == (0.05, 0.09, 0.099)
    assert stats.avg == pytest.approx(0.0505)
    assert probe_report.summarize([]) is None
    single = probe_report.summarize([0.25])
    assert single is not None and single.p50 == single.p99 == single.max == 0.25


def test_report_is_the_json_document_of_a_run() -> None:
    doc = msgspec.json.decode(msgspec.json.encode(probe_report.report(passed())))
    assert (doc["ok"], doc["step"], doc["reason"], doc["exit_code"]) == (True, None, None, 0)
    assert (doc["target"], doc["session_id"]) == ("ws://r/ws", "probe-y")
    assert (doc["started_at"], doc["duration_s"]) == (100.0, 0.25)
    assert doc["frames"] == {"sent": 4, "received": 4}
    assert doc["rtt_s"] == {"count": 2, "min": 0.001, "avg": pytest.approx(0.0015),
                            "p50": 0.001, "p90": 0.002, "p99": 0.002, "max": 0.002}
    assert doc["one_way_s"]["host_to_participant"]["max"] == 0.003
    assert doc["one_way_s"]["participant_to_host"]["min"] == 0.002
    assert doc["connection_ids"] == {"host": "c-h", "participant": "c-p"}
    empty = probe_report.report(failed())
    assert empty["one_way_s"] == {"host_to_participant": None, "participant_to_host": None}


def test_format_summary_states_one_fact_per_line() -> None:
    assert probe_report.format_summary(passed()).splitlines() == [
        "probe ok: ws://r/ws session probe-y",
        "  frames: 4 sent, 4 received byte-exact and in order",
        "  rtt (heartbeat), 2 samples: min 1.000 ms, avg 1.500 ms, p90 2.000 ms, "
        "max 2.000 ms",
        "  one-way host->participant, 2 samples: min 1.000 ms, avg 2.000 ms, p90 3.000 ms, "
        "max 3.000 ms",
        "  one-way participant->host, 2 samples: min 2.000 ms, avg 3.000 ms, p90 4.000 ms, "
        "max 4.000 ms",
        "  duration: 250.0 ms"]
    lines = probe_report.format_summary(failed()).splitlines()
    assert lines[0] == "probe failed at relay: frame 3 lost: ws://r/ws session probe-x"
    assert [line.split(",")[0] for line in lines[1:]] == [
        "  frames: 0 sent", "  rtt (heartbeat)", "  duration: 2500.0 ms"]


def test_failed_results_expose_the_step_and_no_latency() -> None:
    result = failed()
    text = generate_latest(probe_report.metrics_registry(result)).decode()
    found = metrics(text)
    assert found["beach_rescue_probe_success"] == [({"target": "ws://r/ws"}, 0.0)]
    assert found["beach_rescue_probe_last_run_timestamp_seconds"][0][1] == 102.5
    assert found["beach_rescue_probe_failure_step"] == [
        ({"target": "ws://r/ws", "step": "relay", "exit_code": "6"}, 1.0)]
    assert len(found["beach_rescue_probe_rtt_seconds"]) == 5
    assert "beach_rescue_probe_one_way_seconds" not in found
    assert probe_report.failure_line(result) == "probe failed at relay: frame 3 lost"
    assert probe_report.failure_line(passed()) == "probe ok"


def test_write_metrics_file_leaves_only_the_finished_file(tmp_path: Path) -> None:
    path = tmp_path / "beach_rescue_probe.prom"
    probe_report.write_metrics_file(passed(), path)
    assert os.listdir(tmp_path) == [path.name]  # the temporary file was renamed
    found = metrics(path.read_text())
    assert found["beach_rescue_probe_success"] == [({"target": "ws://r/ws"}, 1.0)]
    assert "beach_rescue_probe_failure_step" not in found
    one_way = {(labels["direction"], labels["quantile"]): value
               for labels, value in found["beach_rescue_probe_one_way_seconds"]}
    assert one_way[("host_to_participant", "1")] == 0.003
    assert one_way[("participant_to_host", "0")] == 0.002
