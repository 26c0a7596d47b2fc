"""Relay throughput benchmark (``active``): the real relay against the naive baseline, same run.

``python benches/relay_bench.py [--sessions 1000] [--duration 20] [--runs 3]
[--relays rescue,naive] [--quick] [--find-capacity]``

For every round and every relay (alternating: rescue, naive, rescue, naive, ...): start the relay
pinned to ``--relay-cpus`` (CPU 0), wait for ``/healthz``, run :mod:`loadgen` from
``--gen-cpus`` (CPU 1), sample the relay's CPU seconds (user+sys over its process tree) exactly at
the edges of the measured window, read its peak RSS, stop it. The headline number is relay CPU
microseconds per relayed message = relay CPU seconds in the window / frames the clients received in
the window. Medians over the rounds and the ratio rescue/naive go to the summary table and to
``benches/results/relay-<UTC timestamp>.json``.

With ``--find-capacity`` the session count is stepped up instead (:mod:`capacity_search`) until
a run no longer holds (p95 >= 40 ms, any loss, or the generator bound); the largest S that held,
the extrapolated per-core capacity and the cores a 5,000-session run needs are printed and
written to ``benches/results/capacity-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from bench_report import Metric, run_lines, write_result
from bench_runner import (
    BenchContext,
    RelaySampler,
    add_common_arguments,
    alternate,
    finish,
    prepare,
    result_header,
    run_counted,
    with_relay,
)
from capacity_search import CapacityPlan, capacity_lines, search, summarize_rounds
from loadgen import LoadConfig, add_load_arguments, load_config_from_args, run_load
from relay_process import RelayProcess

METRICS: list[Metric] = [
    ("cpu_us_per_msg", "relay CPU per relayed message", "µs"),
    ("relay_cpu_pct", "relay CPU in window", "% core"),
    ("msgs_per_s", "messages relayed", "/s"),
    ("sessions_failed", "sessions failed to connect", ""),
    ("data_delivered_ratio", "data delivered/sent", ""),
    ("data_lost", "data frames lost", ""),
    ("seq_gaps", "sequence gaps", ""),
    ("bad_frames", "malformed frames received", ""),
    ("lat_p50_ms", "latency p50", "ms"),
    ("lat_p95_ms", "latency p95", "ms"),
    ("lat_p99_ms", "latency p99", "ms"),
    ("lat_max_ms", "latency max", "ms"),
    ("input_delivered_ratio", "input delivered/sent", ""),
    ("input_p95_ms", "input latency p95", "ms"),
    ("peak_rss_mib", "relay peak RSS", "MiB"),
    ("gen_cpu_fraction", "generator CPU (total)", "core"),
    ("gen_lag_p99_ms", "generator loop lag p99", "ms"),
    ("gen_sched_lag_p95_ms", "generator schedule lag p95", "ms"),
    ("gen_sched_lag_max_ms", "generator schedule lag max", "ms"),
    ("foreign_cpu_pct", "other processes' CPU", "% core"),
]
RUN_LINE_KEYS = ["cpu_us_per_msg", "lat_p95_ms", "data_delivered_ratio", "peak_rss_mib",
                 "gen_cpu_fraction"]


def run_metrics(load: dict[str, Any], sampler: RelaySampler, peak_rss: int) -> dict[str, Any]:
    """Derive the flat per-run metrics the summary compares."""
    window = sampler.window()
    cpu_s, wall_s = window["relay_cpu_s"], window["wall_s"]
    relayed = load["messages_relayed_in_window"]
    data, inputs, gen = load["data"], load["input"], load["generator"]
    shape = load["config"]
    return {
        "relay_cpu_s": cpu_s,
        "cpu_us_per_msg": round(cpu_s * 1e6 / relayed, 3) if relayed else None,
        "relay_cpu_pct": round(100 * cpu_s / wall_s, 2) if wall_s > 0 else None,
        "msgs_per_s": round(relayed / load["window_s"], 1),
        "data_delivered_ratio": data["delivered_ratio"],
        "data_lost": data["lost"],
        "seq_gaps": data["seq_gaps"] + load["input"]["seq_gaps"],
        "bad_frames": load["bad_frames"],
        "lat_p50_ms": data["latency_ms"]["p50"], "lat_p95_ms": data["latency_ms"]["p95"],
        "lat_p99_ms": data["latency_ms"]["p99"], "lat_max_ms": data["latency_ms"]["max"],
        "input_delivered_ratio": inputs["delivered_ratio"], "input_lost": inputs["lost"],
        "input_p95_ms": inputs["latency_ms"]["p95"],
        "data_bytes_per_s": shape["data_rate"] * shape["data_bytes"],
        "peak_rss_mib": round(peak_rss / 2**20, 2),
        "rss_connected_mib": round(sampler.marks["rss_connected"] / 2**20, 2),
        "gen_cpu_fraction": gen["cpu_fraction_total"],
        "gen_lag_p99_ms": gen["lag_ms"]["p99"],
        "gen_sched_lag_p95_ms": gen["schedule_lag_ms"]["p95"],
        "gen_sched_lag_max_ms": gen["schedule_lag_ms"]["max"],
        "generator_bound": gen["generator_bound"], "generator_reasons": gen["reasons"],
        "sessions_ok": load["connect"]["sessions_ok"],
        "sessions_failed": load["connect"]["sessions_failed"],
        "unexpected_disconnects": load["unexpected_disconnects"],
        "foreign_cpu_pct": window["foreign_cpu_pct"],
        "contended": window["contended"],
    }


def measure(relay: RelayProcess, record: dict[str, Any], cfg: LoadConfig, *, key_dir: str,
            kid: str, label: str) -> dict[str, Any]:
    """Load a healthy relay once; keep the load result in ``record``; return the metrics."""
    record["rss_idle_mib"] = round(relay.rss_bytes() / 2**20, 2)
    cfg.url = relay.url
    cfg.token_keys, cfg.kid = (key_dir, kid) if relay.spec.needs_token else ("", "")
    cfg.session_prefix = f"{label}-{relay.spec.name}"
    sampler = RelaySampler(relay)
    load = asyncio.run(run_load(cfg, sampler))
    record["load"] = load
    if not load["connect"]["sessions_ok"]:
        raise RuntimeError(f"no session connected: {load['connect']['errors']}")
    return run_metrics(load, sampler, relay.peak_rss_bytes())


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--find-capacity`` and the bounds of the search."""
    plan = CapacityPlan()
    group = parser.add_argument_group("capacity search (--find-capacity)")
    group.add_argument("--find-capacity", action="store_true",
                       help="step the session count up until p95 >= the limit, any loss or "
                            "the generator bound; print the largest S that held")
    group.add_argument("--capacity-start", type=int, default=plan.start)
    group.add_argument("--capacity-factor", type=float, default=plan.factor,
                       help="growth of S between steps while runs hold")
    group.add_argument("--capacity-refine", type=int, default=plan.refine,
                       help="bisection steps after the first run that did not hold")
    group.add_argument("--capacity-max-sessions", type=int, default=plan.max_sessions)
    group.add_argument("--capacity-max-time", type=float, default=plan.max_time_s,
                       help="seconds for the whole search of one round (all relays)")
    group.add_argument("--p95-limit", type=float, default=plan.p95_limit_ms,
                       help="latency p95 (ms) at or above which a run does not hold")


def find_capacity(ctx: BenchContext, args: argparse.Namespace,
                  run: Callable[[str, str, int], dict[str, Any]]) -> int:
    """Run ``ctx.runs`` capacity searches, write ``capacity-<UTC>.json``, print the verdict."""
    plan = CapacityPlan(start=args.capacity_start, factor=args.capacity_factor,
                        refine=args.capacity_refine, max_sessions=args.capacity_max_sessions,
                        max_time_s=args.capacity_max_time, p95_limit_ms=args.p95_limit)
    rounds, discarded = [], []
    for round_no in range(1, ctx.runs + 1):

        def step(relay: str, sessions: int, round_no: int = round_no) -> dict[str, Any]:
            attempts = run_counted(
                ctx, lambda name, label: run(name, label, sessions), relay, round_no,
                RUN_LINE_KEYS, tag=f"s{sessions}")
            discarded.extend(attempts[:-1])
            return attempts[-1]

        rounds.append(search(ctx.relays, plan, step))
    result = {"rounds": rounds, "summary": summarize_rounds(rounds, ctx.relays)}
    counted = [r for rnd in rounds for r in rnd["records"] if r.get("ok")]
    payload = result_header("capacity", ctx, {"plan": asdict(plan),
                                              "load": vars(args) | {"runs": ctx.runs}}) | {
        **result, "discarded_attempts": discarded,
        "contended": any(r["metrics"].get("contended") for r in counted)}
    path = write_result("capacity", payload)
    print(f"\ncapacity search: {args.data_bytes} B at {args.data_rate:g}/s per host "
          f"(+{args.input_bytes} B at {args.input_rate:g}/s back), {args.warmup:g} s warm-up, "
          f"{args.duration:g} s window per step, p95 limit {plan.p95_limit_ms:g} ms")
    for rnd in rounds:
        print(run_lines(rnd["records"], ["sessions_ok", *RUN_LINE_KEYS[:2], "relay_cpu_pct",
                                         "gen_cpu_fraction", "gen_sched_lag_p95_ms"]))
        if rnd["stopped"]:
            print(f"  stopped: {rnd['stopped']}")
    print()
    for line in capacity_lines(result, ctx.relays):
        print(line)
    print(f"\nresults: {path}")
    return 0 if any(c["sessions_held"] for rnd in rounds for c in rnd["capacity"].values()) \
        else 1


def main() -> int:
    """Run the benchmark rounds (or the capacity search), write the JSON result and print the
    summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, sessions=1000, duration=20.0, warmup=5.0)
    add_common_arguments(parser, with_gen_cpus=False)
    add_capacity_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.duration, args.warmup = 50, 5.0, 2.0
        args.capacity_start, args.capacity_max_sessions = 50, 200
    ctx = prepare(parser, args, default_runs=1 if args.find_capacity else 3)
    most = max(args.sessions, args.capacity_max_sessions if args.find_capacity else 0)
    ramp_s = most / args.ramp if args.ramp > 0 else 0.0
    ctx.relay_lifetime_s = 300 + ramp_s + args.warmup + args.duration + args.drain

    def run(relay_name: str, label: str, sessions: int = args.sessions) -> dict[str, Any]:
        cfg = load_config_from_args(args, url="")
        cfg.sessions = sessions
        return with_relay(ctx, relay_name, label,
                          lambda relay, record: measure(relay, record, cfg, key_dir=ctx.key_dir,
                                                        kid=ctx.kid, label=label))

    if args.find_capacity:
        return find_capacity(ctx, args, run)
    records = alternate(ctx, run, RUN_LINE_KEYS)
    headline = (f"relay bench: {args.sessions} sessions x {args.data_bytes} B at "
                f"{args.data_rate:g}/s (+{args.input_bytes} B at {args.input_rate:g}/s back), "
                f"{args.duration:g} s window, {ctx.runs} round(s)")
    return finish("relay", ctx, records, metrics=METRICS, line_keys=RUN_LINE_KEYS,
                  headline=headline,
                  config={"quick": args.quick, "load": vars(args) | {"runs": ctx.runs}})


if __name__ == "__main__":
    sys.exit(main())
