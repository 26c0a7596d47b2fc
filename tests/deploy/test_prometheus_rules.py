"""The Prometheus alert rules and scrape example: valid, tested, and about metrics that exist.

``promtool`` (Debian package ``prometheus``) checks the rules and runs their unit tests;
without it those tests are skipped. The rest reads the YAML with a small line parser made
for the layout of these files (the venv has no YAML library).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.promql import catalogue_names, metric_names, promtool

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "beach-rescue.rules.yml"
RULE_TESTS = PROM_DIR / "beach-rescue.rules.test.yml"
SCRAPE = PROM_DIR / "scrape.yml"
DOCS = ROOT / "docs" / "metrics.md"
REQUIRED_ALERTS = {
    "FallbackActivationHigh", "ConnectionChurnHigh", "RelayCPUHigh", "HandshakeFailureSpike",
    "WorkerRestartLoop", "FallbackPaused", "GuardrailSoftBreach", "SlowConsumerEvictions",
}
MUST_BE_UNIT_TESTED = {"FallbackActivationHigh", "WorkerRestartLoop", "FallbackPaused"}


def mapping_fields(lines: list[str]) -> dict[str, str]:
    """Flatten ``key: value`` lines (block scalars ``|`` included) into one dict."""
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)(?:- )?([A-Za-z_]+):\s*(.*)$", lines[i])
        i += 1
        if match is None:
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3).strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(b for b in block if b)
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def alerts() -> dict[str, dict[str, str]]:
    """Alert name → its fields (expr, for, severity, summary, description, runbook)."""
    found: dict[str, dict[str, str]] = {}
    current: list[str] | None = None
    blocks: list[list[str]] = []
    for line in RULES.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if re.match(r"^\s*- alert:", line):
            current = [line]
            blocks.append(current)
        elif re.match(r"^\s*- (name|record):", line):
            current = None
        elif current is not None:
            current.append(line)
    for block in blocks:
        fields = mapping_fields(block)
        found[fields["alert"]] = fields
    return found


def test_every_issue_alert_is_defined_with_severity_and_annotations() -> None:
    defined = alerts()
    assert set(defined) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(defined)
    docs = DOCS.read_text()
    for name, fields in defined.items():
        assert fields.get("expr"), name
        assert re.fullmatch(r"\d+[smh]", fields.get("for", "")), name
        assert fields.get("severity") in ("critical", "warning"), name
        assert fields.get("summary") and fields.get("description"), name
        anchor = f"runbook-{name.lower()}"
        assert fields.get("runbook", "").startswith(f"docs/metrics.md#{anchor}:"), name
        assert f"### Runbook: {name}\n" in docs, f"docs/metrics.md lacks a runbook for {name}"


def test_rules_reference_only_metrics_the_relay_exposes() -> None:
    known = catalogue_names()
    for name, fields in alerts().items():
        used = metric_names(fields["expr"])
        assert used, f"{name} uses no beach_rescue_ metric"
        assert used <= known, f"{name} uses unknown metrics {sorted(used - known)}"


def test_thresholds_are_those_of_the_issue() -> None:
    defined = alerts()
    activation = defined["FallbackActivationHigh"]["expr"]
    assert "beach_rescue_fallback_tokens_issued_total{guardrail!=\"exempt\"}[1h]" in activation
    assert "beach_rescue_sessions_counted_total[1h]" in activation
    assert activation.rstrip().endswith("> 0.005")
    assert "[5m]" in defined["ConnectionChurnHigh"]["expr"]
    assert "> 0.2" in defined["ConnectionChurnHigh"]["expr"]
    assert "beach_rescue_workers" in defined["RelayCPUHigh"]["expr"]
    assert defined["RelayCPUHigh"]["expr"].rstrip().endswith("> 0.7")
    assert re.search(r"worker_restarts_total\[15m\]\)\) > 3$", defined["WorkerRestartLoop"]["expr"])
    assert defined["FallbackPaused"]["for"] == "1m"
    assert defined["FallbackPaused"]["expr"].rstrip().endswith("> 0")


def test_unit_tests_cover_firing_and_quiet_inputs() -> None:
    text = RULE_TESTS.read_text()
    for name in MUST_BE_UNIT_TESTED:
        cases = re.findall(rf"alertname: {name}\n\s*exp_alerts:( \[\])?", text)
        assert ("" in cases) and (" []" in cases), f"{name} needs a firing and a quiet case"
    assert re.search(r"^rule_files:\n\s*- beach-rescue\.rules\.yml$", text, re.MULTILINE)


def test_scrape_example_sends_the_metrics_key_from_a_file() -> None:
    fields = mapping_fields(SCRAPE.read_text().splitlines())
    assert fields["metrics_path"] == "/metrics"
    assert fields["type"] == "Bearer"
    assert fields["credentials_file"].startswith("/")
    assert "bearer_token" not in SCRAPE.read_text()  # never the key itself inline


# --- promtool ----------------------------------------------------------------------------

def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fail_when_a_threshold_is_wrong(tmp_path: Path) -> None:
    binary = promtool()
    loose = RULES.read_text().replace("> 0.005", "> 0.5")
    assert loose != RULES.read_text()
    (tmp_path / RULES.name).write_text(loose)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = run(binary, "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0
    assert "FallbackActivationHigh" in result.stdout + result.stderr


def test_promtool_accepts_the_scrape_example_with_its_rules(tmp_path: Path) -> None:
    binary = promtool()
    key_file = tmp_path / "metrics-key"
    key_file.write_text("k" * 32 + "\n")
    config = re.sub(r"credentials_file: \S+", f"credentials_file: {key_file}",
                    SCRAPE.read_text())
    (tmp_path / "scrape.yml").write_text(config)
    (tmp_path / RULES.name).write_text(RULES.read_text())
    result = run(binary, "check", "config", str(tmp_path / "scrape.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules found" in result.stdout + result.stderr  # the rule file was checked too
