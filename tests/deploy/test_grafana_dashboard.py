"""The Grafana dashboard: importable, complete, and querying only metrics that exist."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.promql import catalogue_names, metric_names, promtool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "beach-rescue.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
# What the issue asks the dashboard to show, and a metric each must be drawn from.
TOPICS = {
    "fallback activation rate": {"beach_rescue_fallback_tokens_issued_total",
                                 "beach_rescue_sessions_counted_total"},
    "concurrency": {"beach_rescue_connections", "beach_rescue_peers", "beach_rescue_sessions"},
    "session duration": {"beach_rescue_session_duration_seconds_bucket"},
    "bytes/s": {"beach_rescue_bytes_forwarded_total"},
    "close codes": {"beach_rescue_closes_total"},
    "handshake failures": {"beach_rescue_handshakes_total",
                           "beach_rescue_upgrades_refused_total"},
    "hand-offs": {"beach_rescue_handoffs_total"},
    "worker restarts": {"beach_rescue_worker_restarts_total"},
    "drain progress": {"beach_rescue_drain_in_progress", "beach_rescue_drain_peers_notified_total"},
    "soft breaches": {"beach_rescue_guardrail_soft_breaches_total"},
    "pause switch": {"beach_rescue_fallback_paused"},
    "CPU": {"beach_rescue_worker_cpu_seconds_total", "beach_rescue_workers"},
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    out = [t["expr"] for p in panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_every_query_uses_only_metrics_the_relay_exposes() -> None:
    known = catalogue_names()
    exprs = queries()
    assert len(exprs) >= 20
    for expr in exprs:
        used = metric_names(expr)
        assert used, f"query uses no beach_rescue_ metric: {expr}"
        assert used <= known, f"unknown metrics {sorted(used - known)} in: {expr}"


def test_dashboard_covers_every_topic_of_the_issue() -> None:
    used = set().union(*(metric_names(e) for e in queries()))
    for topic, wanted in TOPICS.items():
        assert wanted <= used, f"{topic}: no panel queries {sorted(wanted - used)}"


def test_datasource_is_the_import_input() -> None:
    data = dashboard()
    inputs = {i["name"]: i for i in data["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    graphs = [p for p in panels() if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in data["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_dashboard_shape_is_importable() -> None:
    data = dashboard()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"] and data["title"] and data["id"] is None
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    refs = [t["refId"] for p in panels() for t in p.get("targets", [])]
    per_panel = [[t["refId"] for t in p.get("targets", [])] for p in panels()]
    assert refs and all(len(r) == len(set(r)) for r in per_panel)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, passes ``promtool check rules``."""
    binary = promtool()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    exprs = [e for e in queries() if not e.startswith("label_values(")]
    assert exprs
    for i, expr in enumerate(exprs):
        promql = (expr.replace("$__rate_interval", "5m").replace("$job", ".*")
                  .replace("$instance", ".*"))
        assert "$" not in promql, f"unhandled variable in: {expr}"
        lines += [f"      - record: dashboard_query_{i}", f"        expr: {json.dumps(promql)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run([binary, "check", "rules", str(rules)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout + result.stderr
