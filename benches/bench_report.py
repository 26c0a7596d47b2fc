"""Results of the benches: medians over runs, rescue/naive ratios, the JSON file and the table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Metric = tuple[str, str, str]
"""(key in a run's ``metrics``, label for the table, unit)."""


def median(values: Sequence[float | int | None]) -> float | None:
    """Return the median of the values that are not None (None if there are none)."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]], relays: Sequence[str],
              metrics: Sequence[Metric]) -> dict[str, Any]:
    """Return per-metric medians for each relay and the ratio first/second relay.

    ``runs`` are the records of every run (``{"relay": name, "ok": bool, "metrics": {...}}``);
    failed and discarded runs are left out of the medians.
    """
    medians: dict[str, dict[str, float | None]] = {}
    for relay in relays:
        ok = [r["metrics"] for r in runs
              if r["relay"] == relay and r.get("ok") and not r.get("discarded")]
        medians[relay] = {key: median([m.get(key) for m in ok]) for key, _, _ in metrics}
        medians[relay]["runs_ok"] = len(ok)
    ratios: dict[str, float | None] = {}
    if len(relays) >= 2:
        first, second = relays[0], relays[1]
        for key, _, _ in metrics:
            a, b = medians[first].get(key), medians[second].get(key)
            ratios[key] = round(a / b, 3) if a is not None and b not in (None, 0) else None
    return {"medians": medians,
            "ratio": {"of": f"{relays[0]}/{relays[1]}" if len(relays) >= 2 else None,
                      "values": ratios}}


def fmt(value: float | None) -> str:
    """Format a number for a table: thousands separators, about three significant digits."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def summary_rows(summary: dict[str, Any], columns: Sequence[str],
                 metrics: Sequence[Metric]) -> list[list[str]]:
    """Return the summary as rows of cells: a header, one row per metric (medians, ratio) and
    the count of runs that went into the medians."""
    headers = ["metric", *[f"{r} (median)" for r in columns]]
    ratio_of = summary["ratio"]["of"]
    if ratio_of:
        headers.append(ratio_of)
    rows = [headers]
    for key, label, unit in metrics:
        row = [f"{label} [{unit}]" if unit else label]
        row += [fmt(summary["medians"][r].get(key)) for r in columns]
        if ratio_of:
            row.append(fmt(summary["ratio"]["values"].get(key)))
        rows.append(row)
    rows.append(["runs ok", *[str(summary["medians"][r]["runs_ok"]) for r in columns]]
                + ([""] if ratio_of else []))
    return rows


def summary_table(summary: dict[str, Any], relays: Sequence[str],
                  metrics: Sequence[Metric]) -> str:
    """Render the medians (and ratio) as a fixed-width text table."""
    rows = summary_rows(summary, relays, metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """Render rows of cells (the first is the header) as a Markdown table, numbers right-aligned."""
    header, *body = rows
    align = ["---", *["---:"] * (len(header) - 1)]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, align, *body])


def run_lines(runs: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """Render one line per run with a few headline metrics (or its error)."""
    lines = []
    for r in runs:
        head = f"  round {r['round']}.{r.get('attempt', 1)} {r['relay']:<7}"
        if not r.get("ok"):
            lines.append(f"{head} FAILED: {r.get('error', '?')}")
            continue
        parts = [f"{k}={fmt(r['metrics'].get(k))}" for k in keys]
        m = r["metrics"]
        parts.append(f"foreign_cpu={m.get('foreign_cpu_pct')}%")
        if r.get("discarded"):
            parts.append(f"[discarded: {r['discarded']}]")
        elif m.get("generator_bound"):
            parts.append("[generator_bound]")
        lines.append(f"{head} " + " ".join(parts))
    return "\n".join(lines)


def write_result(bench: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benches/results/<bench>-<UTC timestamp>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{bench}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
