"""One Markdown page from bench result files: ``python -m benches summary FILE.json ...``.

:func:`render` turns the JSON results of any of the benches (idle, active / relay, capacity,
handoff, storm, webrtc, workers) into a Markdown summary: the machine and versions once, then
per file its medians side by side with the same-run baseline and the ratio, the verdict lines
(capacity, hand-off cost, storm recovery) and the warnings (contended, generator-bound). The
standard set (:mod:`bench_suite`) writes it to ``benches/results/summary-<UTC>.md``; with
``--out`` this module does the same for any files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import handoff_bench
import idle_bench
import relay_bench
import storm_bench
import webrtc_bench
import workers_bench
from bench_report import RESULTS_DIR, Metric, fmt, markdown_table, summary_rows
from capacity_search import TARGET_SESSIONS

TITLES = {"idle": "Idle connections", "relay": "Active sessions (fixed S)",
          "capacity": "Capacity at p95 < 40 ms", "handoff": "Hand-off cost and accept rate",
          "storm": "Reconnect storm", "webrtc": "WebSocket fallback vs WebRTC data channel",
          "workers": "CPU per message, 2 workers vs 1"}


def _flags(payload: dict[str, Any]) -> list[str]:
    out = []
    if payload.get("contended"):
        out.append("**contended**: other processes used more than 10 % of a core during a "
                   "counted run; latencies are unreliable (CPU per message is not affected)")
    if payload.get("generator_bound"):
        out.append("**generator-bound**: the load generator, not the relay, limited a run")
    return [line for text in out for line in ("", f"> {text}")]


def _table(summary: dict[str, Any], columns: Sequence[str], metrics: Sequence[Metric]) -> str:
    present = [m for m in metrics
               if any(summary["medians"].get(c, {}).get(m[0]) is not None for c in columns)]
    return markdown_table(summary_rows(summary, columns, present))


def _medians(payload: dict[str, Any], metrics: Sequence[Metric],
             columns: Sequence[str] | None = None) -> list[str]:
    columns = columns or payload["config"]["relays"]
    return [_table(payload["summary"], columns, metrics), *_flags(payload)]


def _capacity(payload: dict[str, Any]) -> list[str]:
    relays = payload["config"]["relays"]
    rows = [["S", "relay", "held", "p50 / p95 / p99 / max (ms)", "delivered", "relay CPU",
             "µs/msg", "generator CPU", "sched. lag p95 (ms)", "why not held"]]
    for rnd in payload["rounds"]:
        for r in rnd["records"]:
            m = r.get("metrics") or {}
            lat = " / ".join(fmt(m.get(k)) for k in ("lat_p50_ms", "lat_p95_ms", "lat_p99_ms",
                                                     "lat_max_ms"))
            rows.append([str(r["sessions"]), r["relay"], "yes" if r.get("held") else "no", lat,
                         fmt(m.get("data_delivered_ratio")),
                         f"{fmt(m.get('relay_cpu_pct'))} %", fmt(m.get("cpu_us_per_msg")),
                         fmt(m.get("gen_cpu_fraction")), fmt(m.get("gen_sched_lag_p95_ms")),
                         "; ".join(r.get("why") or []) or "-"])
    out = [markdown_table(rows), ""]
    verdict = [["relay", "largest S held (median)", "relay cores at S",
                "extrapolated sessions per core", "MB/s per core",
                f"cores for {TARGET_SESSIONS:,} sessions", "with 20 % headroom", "stopped by"]]
    for relay in relays:
        caps = [rnd["capacity"][relay] for rnd in payload["rounds"]]
        med = payload["summary"]["medians"][relay]
        last = caps[-1]
        verdict.append([relay, fmt(med["sessions_held"]), fmt(last.get("relay_cpu_cores")),
                        fmt(med["per_core_sessions"]), fmt(last.get("per_core_mb_s")),
                        fmt(med["cores_for_target"]),
                        fmt(last.get("cores_for_target_with_headroom")),
                        "; ".join(last["stopped_by"]) or "max sessions / time"])
    out.append(markdown_table(verdict))
    ratio = payload["summary"]["ratio"]
    if ratio["of"]:
        out.append(f"\nRatio {ratio['of']}: " + ", ".join(
            f"{k} {fmt(v)}" for k, v in ratio["values"].items()))
    return out + _flags(payload)


def _handoff(payload: dict[str, Any]) -> list[str]:
    out = []
    if payload.get("probe_runs"):
        out += [_table(payload["probe_summary"], ["w2", "w1"], handoff_bench.PROBE_METRICS), ""]
    d = payload["derived"]
    if d.get("handoff_cost_p95_ms") is not None:
        out.append(f"Hand-off cost (added time to `server_hello`, handed off - local, 2 "
                   f"workers): p50 {fmt(d['handoff_cost_p50_ms'])} ms, p95 "
                   f"{fmt(d['handoff_cost_p95_ms'])} ms (target < 1 ms); relay CPU "
                   f"{fmt(d.get('handoff_cpu_us'))} µs per handed-off connection.\n")
    if payload.get("accept_runs"):
        columns = list(payload["accept_summary"]["medians"])
        out += [_table(payload["accept_summary"], columns, handoff_bench.ACCEPT_METRICS),
                f"\nAccept rate relative to 1 worker: {d.get('accept_rate_vs_w1')}"]
    return out + _flags(payload)


def _storm(payload: dict[str, Any]) -> list[str]:
    out = _medians(payload, storm_bench.METRICS)
    ok = payload.get("all_back_and_paired_every_round")
    out.append(f"\nEvery dropped peer back and every session paired in every round: **{ok}**")
    out += [f"- FAILED {line}" for line in payload.get("failed_rounds", [])]
    return out


def _revisions(payload: dict[str, Any]) -> list[str]:
    """The code revisions the counted runs were started from (``+`` marks a modified tree)."""
    records = [r for key in ("runs", "probe_runs", "accept_runs") for r in payload.get(key, [])]
    records += [r for rnd in payload.get("rounds", []) for r in rnd["records"]]
    seen = []
    for r in records:
        code = r.get("code")
        if code and not r.get("discarded"):
            rev = f"{code['git_revision']}{'+' if code['git_dirty'] else ''}"
            if rev not in seen:
                seen.append(rev)
    return seen


def section(path: Path) -> str:
    """Render one result file as a Markdown section."""
    payload = json.loads(path.read_text())
    bench = payload.get("bench", "?")
    lines = [f"## {TITLES.get(bench, bench)} — `{path.name}`", ""]
    cfg = payload.get("config", {})
    lines.append(f"Started {payload.get('started_utc')}, {payload.get('elapsed_s')} s, "
                 f"{cfg.get('runs')} round(s); relay CPUs {cfg.get('relay_cpus')}, generator "
                 f"CPUs {cfg.get('gen_cpus')}.")
    revisions = _revisions(payload)
    if revisions:
        lines.append(f"Code of the counted runs: {', '.join(revisions)}"
                     f"{' (the tree changed during the bench)' if len(revisions) > 1 else ''}"
                     " (`+`: rescue/ or supervisor/ modified).")
    lines.append("")
    if bench == "capacity":
        lines += _capacity(payload)
    elif bench == "handoff":
        lines += _handoff(payload)
    elif bench == "storm":
        lines += _storm(payload)
    elif bench == "webrtc":
        lines += _medians(payload, webrtc_bench.METRICS, cfg["variants"])
    elif bench in ("relay", "idle", "workers"):
        metrics = {"relay": relay_bench.METRICS, "idle": idle_bench.METRICS,
                   "workers": workers_bench.METRICS}[bench]
        lines += _medians(payload, metrics)
        lines += [f"- {note}" for note in cfg.get("notes", [])]
    else:
        lines.append("(no renderer for this bench)")
    return "\n".join(lines) + "\n"


def render(paths: Sequence[Path], title: str = "Benchmark summary",
           notes: Sequence[str] = ()) -> str:
    """Render the result files as one Markdown page (machine and versions from the first)."""
    first = json.loads(paths[0].read_text()) if paths else {}
    m = first.get("machine", {})
    head = [f"# {title}", "",
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())} from "
            f"{len(paths)} result file(s) in `benches/results/`.", "",
            f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
            f"Linux {m.get('kernel')}, Python {m.get('python')}, RLIMIT_NOFILE "
            f"{m.get('rlimit_nofile')}; git {m.get('git_revision')}"
            f"{' (rescue/ or supervisor/ modified)' if m.get('git_dirty') else ''}.", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()),
            "", "Ratios are first/second column of the same run (same machine, same minutes): "
            "below 1 means the first spends less.", ""]
    head += [f"- {note}" for note in notes]
    return "\n".join(head) + "\n\n" + "\n".join(section(p) for p in paths)


def write_summary(paths: Sequence[Path], notes: Sequence[str] = ()) -> Path:
    """Write :func:`render` of ``paths`` to ``benches/results/summary-<UTC>.md``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS_DIR / f"summary-{stamp}.md"
    out.write_text(render(paths, notes=notes))
    return out


def main() -> int:
    """Render the given result files to stdout, or to a summary file with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", action="store_true",
                        help="write benches/results/summary-<UTC>.md instead of printing")
    args = parser.parse_args()
    if args.out:
        print(write_summary(args.files))
    else:
        sys.stdout.write(render(args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
