"""Multi-worker throughput: CPU per relayed message with ``--workers 2`` against ``--workers 1``.

``python benches/workers_bench.py [--sessions 1000] [--duration 20] [--runs 3] [--quick]``

The load and the measurement are :mod:`relay_bench`'s (1,000 sessions x 4 KiB at 16/s, relay CPU
seconds over its whole process tree in the window / frames received in the window), run against
``rescue2`` (supervisor + 2 workers) and ``rescue`` (supervisor + 1 worker), alternating in the
same run. Each relay also gets its admin listener, so after the load the bench reads the
supervisor's table of every worker's intake counters (``/debug/stats`` -> ``workers``) and
reports the fraction of connections that were handed to another worker (handed_off / accepted,
counted over the load only).

Pinning: the relay's whole process tree (supervisor and every worker) is pinned to
``--relay-cpus`` (CPU 0) and the generators to ``--gen-cpus`` (CPU 1) for both relays. With two
workers both share CPU 0, so CPU per message compares the same amount of hardware; what it
measures is the cost of the multi-process design itself (two event loops, hand-off at connect),
not a speed-up. Results: ``benches/results/workers-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import psutil
import relay_bench
from bench_report import Metric, summarize
from bench_runner import add_common_arguments, alternate, finish, prepare
from loadgen import add_load_arguments, load_config_from_args
from multiworker_runner import (
    RescueRelay,
    intake_delta,
    intake_totals,
    wait_for_table,
    with_rescue,
)
from relay_process import relay_spec

METRICS: list[Metric] = [
    *relay_bench.METRICS,
    ("handoff_fraction", "connections handed off", "fraction"),
    ("accepted", "connections accepted (load)", ""),
    ("handed_off", "connections handed off (load)", ""),
    ("handoff_failures", "hand-off failures", ""),
    ("relay_processes", "relay processes", ""),
    ("supervisor_cpu_share", "supervisor's share of relay CPU (whole load)", "fraction"),
]
RUN_LINE_KEYS = ["cpu_us_per_msg", "handoff_fraction", "lat_p95_ms", "data_delivered_ratio",
                 "gen_cpu_fraction"]
TARGET_RATIO = 1.10


def measure(relay: RescueRelay, record: dict[str, Any], args: argparse.Namespace, *,
            key_dir: str, kid: str, label: str, workers: int) -> dict[str, Any]:
    """Run relay_bench's load against ``relay``; add the intake counters of the load."""
    before = intake_totals(wait_for_table(relay, workers))
    cfg = load_config_from_args(args, url="")
    cpu_before = process_cpu(relay)
    metrics = relay_bench.measure(relay.process, record, cfg, key_dir=key_dir, kid=kid,
                                  label=label)
    cpu_after = process_cpu(relay)
    split = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 3) for name in cpu_after}
    record["cpu_by_process_s"] = split
    total = sum(split.values())
    stats = relay.settled_stats()
    record["workers_table"] = stats.get("workers")
    intake = intake_delta(before, intake_totals(stats))
    record["intake"] = intake
    metrics.update(accepted=intake["accepted"], handed_off=intake["handed_off"],
                   handoff_failures=intake["handoff_failures"],
                   handoff_fraction=intake["handoff_fraction"],
                   relay_processes=relay.process.processes(),
                   supervisor_cpu_share=round(split.get("supervisor", 0.0) / total, 4)
                   if total else None)
    return metrics


def process_cpu(relay: RescueRelay) -> dict[str, float]:
    """Return CPU seconds so far of the supervisor and of each worker (by slot)."""
    out = {"supervisor": 0.0}
    root = relay.process.root
    with contextlib.suppress(psutil.Error):
        t = root.cpu_times()
        out["supervisor"] = t.user + t.system
    for slot, proc in relay.workers().items():
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[f"worker{slot}"] = t.user + t.system
    return out


def verdict(summary: dict[str, Any], relays: list[str]) -> list[str]:
    """Return the lines that compare the two relays against the 10 % target."""
    medians = summary["medians"]
    if len(relays) < 2:
        return []
    a, b = relays[0], relays[1]
    cpu_a, cpu_b = medians[a].get("cpu_us_per_msg"), medians[b].get("cpu_us_per_msg")
    lines = []
    if cpu_a and cpu_b:
        ratio = cpu_a / cpu_b
        state = "within" if ratio <= TARGET_RATIO else "MISSES"
        lines.append(f"CPU per relayed message {a}/{b} = {cpu_a:.2f}/{cpu_b:.2f} µs = "
                     f"{ratio:.3f} ({state} the {TARGET_RATIO - 1:.0%} target, "
                     f"{100 * (ratio - 1):+.1f} %)")
    for relay in relays:
        fraction = medians[relay].get("handoff_fraction")
        if fraction is not None:
            lines.append(f"{relay}: {fraction:.1%} of connections handed off (median of runs)")
    return lines


def main() -> int:
    """Run the alternating rounds, write the JSON result and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, sessions=1000, duration=20.0, warmup=5.0)
    add_common_arguments(parser, with_gen_cpus=False)
    parser.set_defaults(relays="rescue2,rescue")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.duration, args.warmup = 50, 5.0, 2.0
    ctx = prepare(parser, args, default_runs=3)
    if any(not r.startswith("rescue") for r in ctx.relays):
        parser.error("workers_bench compares rescue relays only (e.g. rescue2,rescue)")

    def run(relay_name: str, label: str) -> dict[str, Any]:
        workers = relay_spec(relay_name).workers
        return with_rescue(ctx, relay_name, label,
                           lambda relay, record: measure(relay, record, args, key_dir=ctx.key_dir,
                                                         kid=ctx.kid, label=label,
                                                         workers=workers))

    pinning = (f"relay tree (supervisor + every worker) pinned to CPU(s) {ctx.relay_cpus or 'any'}"
               f", generators to CPU(s) {ctx.gen_cpus or 'any'}; with 2 workers both workers "
               "share the relay's CPU, so CPU per message is comparable")
    print(f"pinning: {pinning}", file=sys.stderr)
    records = alternate(ctx, run, RUN_LINE_KEYS)
    headline = (f"workers bench: {args.sessions} sessions x {args.data_bytes} B at "
                f"{args.data_rate:g}/s (+{args.input_bytes} B at {args.input_rate:g}/s back), "
                f"{args.duration:g} s window, {ctx.runs} round(s)\npinning: {pinning}")
    summary = summarize(records, ctx.relays, METRICS)
    lines = verdict(summary, ctx.relays)
    status = finish("workers", ctx, records, metrics=METRICS, line_keys=RUN_LINE_KEYS,
                    headline=headline,
                    config={"quick": args.quick, "load": vars(args) | {"runs": ctx.runs},
                            "pinning": pinning, "target_ratio": TARGET_RATIO,
                            "verdict": lines})
    print()
    for line in lines:
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
