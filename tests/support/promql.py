"""Metric names in PromQL, the sample names the relay really exposes, and ``promtool``.

Shared by the deploy tests that check the Grafana dashboard and the Prometheus rules
against :mod:`rescue.metrics`.
"""

from __future__ import annotations

import re
import shutil

import pytest
from prometheus_client.metrics import MetricWrapperBase

from rescue import metrics

METRIC_NAME = re.compile(r"beach_rescue_[a-z0-9_]*[a-z0-9]")


def metric_names(expr: str) -> set[str]:
    """The ``beach_rescue_*`` metric names a PromQL expression mentions."""
    return set(METRIC_NAME.findall(expr))


def catalogue_names() -> set[str]:
    """Sample names the relay exposes, derived from the objects in :mod:`rescue.metrics`."""
    names: set[str] = set()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        if metric._type == "counter":
            names.add(metric._name + "_total")
        elif metric._type == "histogram":
            names.update(metric._name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(metric._name)
    return names


def promtool() -> str:
    """The path of ``promtool``; skips the calling test when it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; "
                    "scripts/dev.sh test installs it)")
    return path
