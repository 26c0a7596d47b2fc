"""The metric catalogue: growth folding, exposition, multiprocess aggregation, label hygiene."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from rescue import metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
FORBIDDEN_LABELS = {"session", "peer", "session_id", "peer_id", "connection_id"}


def catalogue() -> list[MetricWrapperBase]:
    """Every metric object defined in :mod:`rescue.metrics`."""
    return [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]


def exposed_names(metric: MetricWrapperBase) -> set[str]:
    """The sample names ``metric`` appears under in the exposition (multiprocess mode)."""
    name, kind = metric._name, metric._type
    if kind == "counter":
        return {name + "_total"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


def value_of(registry: CollectorRegistry, sample: str, **labels: str) -> float:
    value = registry.get_sample_value(sample, labels)
    return 0.0 if value is None else value


# --- StatsFolder -------------------------------------------------------------------------

readings = st.lists(st.tuples(st.sampled_from(["a", "b", None]),
                              st.integers(min_value=0, max_value=10**12)), max_size=40)


@given(readings)
def test_folder_adds_only_growth_per_label(steps: list[tuple[str | None, int]]) -> None:
    registry = CollectorRegistry()
    labelled = Counter("t_labelled", "test", ["kind"], registry=registry)
    plain = Counter("t_plain", "test", registry=registry)
    folder = metrics.StatsFolder()
    last: dict[str | None, int] = {}
    expected: dict[str | None, int] = {"a": 0, "b": 0, None: 0}
    for label, value in steps:
        before = {k: value_of(registry, "t_labelled_total", kind=k) for k in ("a", "b")}
        before_plain = value_of(registry, "t_plain_total")
        if label is None:
            folder.add(plain, value)
        else:
            folder.add(labelled, value, label)
        expected[label] += max(0, value - last.get(label, 0))
        last[label] = value
        # Never negative, and only the label that was folded moves.
        for k in ("a", "b"):
            now = value_of(registry, "t_labelled_total", kind=k)
            assert now >= before[k]
            if k != label:
                assert now == before[k]
        assert value_of(registry, "t_plain_total") >= before_plain
    assert value_of(registry, "t_labelled_total", kind="a") == expected["a"]
    assert value_of(registry, "t_labelled_total", kind="b") == expected["b"]
    assert value_of(registry, "t_plain_total") == expected[None]


def test_folder_add_all_folds_every_label_of_a_mapping() -> None:
    registry = CollectorRegistry()
    closes = Counter("t_closes", "test", ["reason"], registry=registry)
    folder = metrics.StatsFolder()
    folder.add_all(closes, {"NORMAL": 5, "IDLE_TIMEOUT": 2})
    folder.add_all(closes, {"NORMAL": 7, "IDLE_TIMEOUT": 2, "SLOW_CONSUMER": 1})
    folder.add_all(closes, {"NORMAL": 3})  # a reset: nothing is taken away
    assert value_of(registry, "t_closes_total", reason="NORMAL") == 7
    assert value_of(registry, "t_closes_total", reason="IDLE_TIMEOUT") == 2
    assert value_of(registry, "t_closes_total", reason="SLOW_CONSUMER") == 1


# --- the catalogue -----------------------------------------------------------------------

def test_catalogue_is_prefixed_and_typed() -> None:
    found = catalogue()
    assert len(found) >= 30
    names = [m._name for m in found]
    assert len(names) == len(set(names))
    for metric in found:
        assert metric._name.startswith("beach_rescue_"), metric._name
        assert metric._type in ("counter", "gauge", "histogram"), metric._name
        assert metric._documentation, metric._name


def test_gauges_have_a_live_multiprocess_mode() -> None:
    gauges = [m for m in catalogue() if isinstance(m, Gauge)]
    assert gauges
    for gauge in gauges:
        # "all" (the default) would keep one series per pid, dead workers included.
        assert gauge._multiprocess_mode in ("livesum", "livemax", "livemin"), gauge._name


def test_no_label_carries_an_identity() -> None:
    for metric in catalogue():
        assert not FORBIDDEN_LABELS & set(metric._labelnames), metric._name


def test_exposition_lists_the_whole_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    text = metrics.exposition().decode()
    families = {(f.name, f.type) for f in text_string_to_metric_families(text)}
    for metric in catalogue():
        assert (metric._name, metric._type) in families, metric._name


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import os, sys
    from rescue import metrics

    def sample(name):
        for line in metrics.exposition().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    pid = os.fork()
    if pid == 0:  # a worker: live gauges and a counter, then it dies unreaped by Prometheus
        metrics.WORKERS.set(1)
        metrics.CONNECTIONS.set(5)
        metrics.HEARTBEATS.inc(3)
        os._exit(0)
    os.waitpid(pid, 0)
    metrics.WORKERS.set(1)
    metrics.CONNECTIONS.set(2)
    metrics.HEARTBEATS.inc(4)
    print(sample("beach_rescue_workers"), sample("beach_rescue_connections"),
          sample("beach_rescue_heartbeats_answered_total"))
    metrics.mark_dead(pid)
    print(sample("beach_rescue_workers"), sample("beach_rescue_connections"),
          sample("beach_rescue_heartbeats_answered_total"))
""")


def test_multiprocess_gauges_sum_live_processes_and_mark_dead_drops_them(
        tmp_path: Path) -> None:
    env = dict(os.environ, **{metrics.ENV: str(tmp_path)})
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    before, after = (line.split() for line in result.stdout.splitlines())
    assert before == ["2.0", "7.0", "7.0"]  # workers and connections summed over both
    assert after == ["1.0", "2.0", "7.0"]  # the dead one's gauges gone, its counts kept


# --- the documentation -------------------------------------------------------------------

def test_docs_describe_every_metric_and_only_existing_ones() -> None:
    text = DOCS.read_text()
    exposed = set().union(*(exposed_names(m) for m in catalogue()))
    bases = {m._name for m in catalogue()}
    for metric in catalogue():
        shown = metric._name if metric._type == "histogram" else next(
            iter(exposed_names(metric)))
        assert f"`{shown}`" in text, f"{shown} is missing from docs/metrics.md"
    mentioned = set(re.findall(r"beach_rescue_[a-z0-9_]*[a-z0-9]", text))
    assert mentioned
    assert mentioned <= exposed | bases, mentioned - exposed - bases


def test_docs_state_each_gauges_multiprocess_mode() -> None:
    text = DOCS.read_text()
    for gauge in (m for m in catalogue() if isinstance(m, Gauge)):
        row = re.search(rf"^\| `{gauge._name}` \| (\w+) \|", text, re.MULTILINE)
        assert row is not None, gauge._name
        assert row.group(1) == gauge._multiprocess_mode, gauge._name
