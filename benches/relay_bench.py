"""Relay throughput benchmark: the real relay against the naive baseline, in the same run.

``python benches/relay_bench.py [--sessions 1000] [--duration 20] [--runs 3]
[--relays rescue,naive] [--quick]``

For every round and every relay (alternating: rescue, naive, rescue, naive, ...): start the relay
pinned to ``--relay-cpus`` (CPU 0), wait for ``/healthz``, run :mod:`loadgen` from
``--gen-cpus`` (CPU 1), sample the relay's CPU seconds (user+sys over its process tree) exactly at
the edges of the measured window, read its peak RSS, stop it. The headline number is relay CPU
microseconds per relayed message = relay CPU seconds in the window / frames the clients received in
the window. Medians over the rounds and the ratio rescue/naive go to the summary table and to
``benches/results/relay-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench_report import Metric
from bench_runner import (
    RelaySampler,
    add_common_arguments,
    alternate,
    finish,
    prepare,
    with_relay,
)
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
    ("input_p95_ms", "input latency p95", "ms"),
    ("peak_rss_mib", "relay peak RSS", "MiB"),
    ("gen_cpu_fraction", "generator CPU (total)", "core"),
    ("gen_lag_p99_ms", "generator loop lag p99", "ms"),
    ("foreign_cpu_pct", "other processes' CPU", "% core"),
]
RUN_LINE_KEYS = ["cpu_us_per_msg", "lat_p95_ms", "data_delivered_ratio", "peak_rss_mib",
                 "gen_cpu_fraction"]


def run_metrics(load: dict[str, Any], sampler: RelaySampler, peak_rss: int) -> dict[str, Any]:
    """Derive the flat per-run metrics the summary compares."""
    window = sampler.window()
    cpu_s, wall_s = window["relay_cpu_s"], window["wall_s"]
    relayed = load["messages_relayed_in_window"]
    data, gen = load["data"], load["generator"]
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
        "input_p95_ms": load["input"]["latency_ms"]["p95"],
        "peak_rss_mib": round(peak_rss / 2**20, 2),
        "rss_connected_mib": round(sampler.marks["rss_connected"] / 2**20, 2),
        "gen_cpu_fraction": gen["cpu_fraction_total"],
        "gen_lag_p99_ms": gen["lag_ms"]["p99"],
        "generator_bound": gen["generator_bound"],
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


def main() -> int:
    """Run the benchmark rounds, write the JSON result and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, sessions=1000, duration=20.0, warmup=5.0)
    add_common_arguments(parser, with_gen_cpus=False)
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.duration, args.warmup = 50, 5.0, 2.0
    ctx = prepare(parser, args, default_runs=3)
    ramp_s = args.sessions / args.ramp if args.ramp > 0 else 0.0
    ctx.relay_lifetime_s = 300 + ramp_s + args.warmup + args.duration + args.drain

    def run(relay_name: str, label: str) -> dict[str, Any]:
        cfg = load_config_from_args(args, url="")
        return with_relay(ctx, relay_name, label,
                          lambda relay, record: measure(relay, record, cfg, key_dir=ctx.key_dir,
                                                        kid=ctx.kid, label=label))

    records = alternate(ctx, run, RUN_LINE_KEYS)
    headline = (f"relay bench: {args.sessions} sessions x {args.data_bytes} B at "
                f"{args.data_rate:g}/s (+{args.input_bytes} B at {args.input_rate:g}/s back), "
                f"{args.duration:g} s window, {ctx.runs} round(s)")
    return finish("relay", ctx, records, metrics=METRICS, line_keys=RUN_LINE_KEYS,
                  headline=headline,
                  config={"quick": args.quick, "load": vars(args) | {"runs": ctx.runs}})


if __name__ == "__main__":
    sys.exit(main())
