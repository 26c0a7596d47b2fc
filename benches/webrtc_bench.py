"""The WebSocket fallback against a direct WebRTC data channel, on the same workload.

``python benches/webrtc_bench.py [--sessions 20] [--duration 10] [--runs 3]
[--variants ws-e2e,webrtc,ws-raw] [--quick]``

Every variant runs ``--sessions`` sessions, each a host sending 4 KiB messages 16 times a second
(64 KB/s) to its participant, which sends a 64-byte message back once a second, from one
generator process (:mod:`channel_worker`, driven by :func:`loadgen.run_load`) pinned to
``--gen-cpus``:

* ``webrtc``: host and participant connected by an aiortc data channel over loopback (DTLS,
  SCTP), no relay;
* ``ws-e2e``: both through the relay (``rescue``, pinned to ``--relay-cpus``) with the client
  SDK's channel (:mod:`rescue.client.channel`: end-to-end encryption, acks, replay buffer);
* ``ws-raw``: through the relay with plain protocol frames (no E2E), the same aiohttp client.

The variants alternate within each round. Reported side by side: latency p50/p95/p99/max (send
to receive, same clock), and CPU per delivered message: of the peers' process, of the relay, and
both together (the cost of a message wherever it is paid). The ratio column is first/second
variant (``ws-e2e/webrtc`` by default). Results: ``benches/results/webrtc-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bench_report import Metric
from bench_runner import (
    BenchContext,
    RelaySampler,
    add_common_arguments,
    alternate,
    finish,
    note_failure,
    prepare,
    with_relay,
)
from loadgen import LoadConfig, run_load
from relay_process import RelayProcess

WORKER = str(Path(__file__).resolve().with_name("channel_worker.py"))
VARIANTS = ("ws-e2e", "webrtc", "ws-raw")
METRICS: list[Metric] = [
    ("lat_p50_ms", "latency p50", "ms"),
    ("lat_p95_ms", "latency p95", "ms"),
    ("lat_p99_ms", "latency p99", "ms"),
    ("lat_max_ms", "latency max", "ms"),
    ("input_p95_ms", "input latency p95", "ms"),
    ("total_cpu_us_per_msg", "CPU per message, peers + relay", "µs"),
    ("client_cpu_us_per_msg", "CPU per message, peers' process", "µs"),
    ("relay_cpu_us_per_msg", "CPU per message, relay", "µs"),
    ("msgs_per_s", "messages delivered", "/s"),
    ("data_delivered_ratio", "data delivered/sent", ""),
    ("seq_gaps", "sequence gaps", ""),
    ("sessions_failed", "sessions failed to open", ""),
    ("open_p50_ms", "time to open a session p50", "ms"),
    ("client_cpu_fraction", "peers' process CPU", "core"),
    ("gen_sched_lag_p95_ms", "generator schedule lag p95", "ms"),
    ("gen_lag_p99_ms", "generator loop lag p99", "ms"),
    ("foreign_cpu_pct", "other processes' CPU", "% core"),
]
RUN_LINE_KEYS = ["lat_p50_ms", "lat_p95_ms", "total_cpu_us_per_msg", "client_cpu_us_per_msg",
                 "relay_cpu_us_per_msg", "data_delivered_ratio"]


def compare_metrics(load: dict[str, Any], sampler: RelaySampler) -> dict[str, Any]:
    """Derive the flat per-run metrics: latency, and CPU per message on each side."""
    window = sampler.window()
    received = load["messages_relayed_in_window"]
    gen, data = load["generator"], load["data"]
    client_s, relay_s = gen["cpu_s"], window["relay_cpu_s"]

    def per_msg(seconds: float) -> float | None:
        return round(seconds * 1e6 / received, 2) if received else None

    return {
        "lat_p50_ms": data["latency_ms"]["p50"], "lat_p95_ms": data["latency_ms"]["p95"],
        "lat_p99_ms": data["latency_ms"]["p99"], "lat_max_ms": data["latency_ms"]["max"],
        "input_p95_ms": load["input"]["latency_ms"]["p95"],
        "total_cpu_us_per_msg": per_msg(client_s + relay_s),
        "client_cpu_us_per_msg": per_msg(client_s), "relay_cpu_us_per_msg": per_msg(relay_s),
        "client_cpu_s": client_s, "relay_cpu_s": relay_s,
        "msgs_per_s": round(received / load["window_s"], 1),
        "data_delivered_ratio": data["delivered_ratio"], "data_lost": data["lost"],
        "seq_gaps": data["seq_gaps"] + load["input"]["seq_gaps"],
        "sessions_failed": load["connect"]["sessions_failed"],
        "open_p50_ms": load["connect"]["latency_ms"]["p50"],
        "client_cpu_fraction": gen["cpu_fraction_total"],
        "gen_sched_lag_p95_ms": gen["schedule_lag_ms"]["p95"],
        "gen_lag_p99_ms": gen["lag_ms"]["p99"],
        "generator_bound": gen["generator_bound"], "generator_reasons": gen["reasons"],
        "unexpected_disconnects": load["unexpected_disconnects"],
        "foreign_cpu_pct": window["foreign_cpu_pct"], "contended": window["contended"],
    }


def measure(variant: str, relay: RelayProcess | None, record: dict[str, Any], *,
            args: argparse.Namespace, ctx: BenchContext, label: str) -> dict[str, Any]:
    """Run the workload over ``variant`` (through ``relay`` unless WebRTC); return metrics."""
    cfg = LoadConfig(
        url=relay.url if relay else "", sessions=args.sessions, duration_s=args.duration,
        warmup_s=args.warmup, ramp_sessions_per_s=0, procs=1, data_rate=args.data_rate,
        data_bytes=args.data_bytes, input_rate=args.input_rate, input_bytes=args.input_bytes,
        heartbeat_s=0, drain_s=args.drain, connect_concurrency=args.connect_concurrency,
        token_keys=ctx.key_dir if relay else "", kid=ctx.kid if relay else "",
        gen_cpus=ctx.gen_cpus, session_prefix=f"{label}-{variant}", worker=WORKER,
        worker_options={"transport": variant})
    sampler = RelaySampler(relay)
    load = asyncio.run(run_load(cfg, sampler))
    record["load"] = load
    if not load["connect"]["sessions_ok"]:
        raise RuntimeError(f"no session opened: {load['connect']['errors']}")
    return compare_metrics(load, sampler)


def main() -> int:
    """Run the alternating rounds, write the JSON result and print the side-by-side table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="measured window, s")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--data-rate", type=float, default=16.0, help="host messages/s")
    parser.add_argument("--data-bytes", type=int, default=4096)
    parser.add_argument("--input-rate", type=float, default=1.0,
                        help="participant messages/s")
    parser.add_argument("--input-bytes", type=int, default=64)
    parser.add_argument("--drain", type=float, default=3.0)
    parser.add_argument("--connect-concurrency", type=int, default=10,
                        help="sessions opening at once")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}; the ratio is "
                             "first/second")
    add_common_arguments(parser, with_gen_cpus=True)
    parser.set_defaults(relays="rescue")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.duration, args.warmup = 5, 3.0, 1.0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants must name some of {VARIANTS}")
    ctx = prepare(parser, args, default_runs=3)
    if len(ctx.relays) != 1 or not ctx.relays[0].startswith("rescue"):
        parser.error("--relays names the one rescue relay the WebSocket variants go through")

    def run(variant: str, label: str) -> dict[str, Any]:
        if variant != "webrtc":
            return with_relay(ctx, ctx.relays[0], label,
                              lambda relay, record: measure(variant, relay, record, args=args,
                                                            ctx=ctx, label=label))
        record: dict[str, Any] = {"ok": False}
        try:
            record["metrics"] = measure(variant, None, record, args=args, ctx=ctx, label=label)
            record["ok"] = True
        except Exception as e:
            note_failure(record, e)
        return record

    records = alternate(ctx, run, RUN_LINE_KEYS, names=variants)
    relay = ctx.relays[0]
    headline = (f"webrtc-compare: {args.sessions} sessions x {args.data_bytes} B at "
                f"{args.data_rate:g}/s (+{args.input_bytes} B at {args.input_rate:g}/s back), "
                f"{args.duration:g} s window, {ctx.runs} round(s); ws-* through {relay} on CPU(s) "
                f"{ctx.relay_cpus or 'any'}, peers on CPU(s) {ctx.gen_cpus or 'any'}")
    return finish("webrtc", ctx, records, metrics=METRICS, line_keys=RUN_LINE_KEYS,
                  headline=headline, columns=variants,
                  config={"quick": args.quick, "args": vars(args), "relay": relay,
                          "variants": variants})


if __name__ == "__main__":
    sys.exit(main())
