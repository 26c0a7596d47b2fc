"""Idle-connection benchmark: hold N connections that only send protocol heartbeats.

``python benches/idle_bench.py [--connections 10000] [--hold 30] [--runs 1]
[--relays rescue,naive] [--workers N] [--source-addrs K] [--quick]``

For each round and relay: start the relay pinned to ``--relay-cpus``, warm it up with one
session (so lazily built state is not charged to the connections), read its RSS, open N
connections (N/2 sessions: a host and a participant each; hello done) from generator processes
pinned to ``--gen-cpus`` (at most 8,000 sockets each), let them settle, then hold them for
``--hold`` seconds. Each connection sends a heartbeat frame every ``--heartbeat`` seconds (phases
spread evenly); the relay answers each. Reported: connect rate, relay RSS per connection
((RSS held - RSS before) / open connections), relay CPU % of a core over the hold, heartbeat
round trip. Results go to ``benches/results/idle-<UTC timestamp>.json``.

Past ~28k connections one source address runs out of ports to reach the relay's one port, so
the generators bind each connection to one of ``--source-addrs`` loopback addresses
(127.0.0.2, 127.0.0.3, ...; by default as many as needed). A process holds at most ~19,900
sockets here (RLIMIT_NOFILE 20,000), so past 12,500 connections the real relay runs with
several workers (``--workers``, by default one per 12,500 connections) and the naive baseline,
a single process, is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

import aiohttp
from bench_host import loopback_sources
from bench_report import Metric
from bench_runner import (
    RelaySampler,
    add_common_arguments,
    alternate,
    finish,
    prepare,
    with_relay,
)
from bench_tokens import TokenMinter
from loadgen import CPU_BOUND_FRACTION, LoadConfig, run_load
from relay_process import RelayProcess

METRICS: list[Metric] = [
    ("connections_open", "connections held", ""),
    ("connections_failed", "connections failed", ""),
    ("connect_per_s", "connect rate", "conn/s"),
    ("connect_p95_ms", "connect + hello p95", "ms"),
    ("connect_gen_cpu_fraction", "generator CPU while connecting", "of its CPUs"),
    ("rss_before_mib", "relay RSS before", "MiB"),
    ("rss_held_mib", "relay RSS held", "MiB"),
    ("rss_per_conn_kib", "relay RSS per connection", "KiB"),
    ("relay_cpu_pct", "relay CPU during hold", "% core"),
    ("connect_cpu_us", "relay CPU per connect", "µs"),
    ("hb_rtt_p50_ms", "heartbeat RTT p50", "ms"),
    ("hb_rtt_p95_ms", "heartbeat RTT p95", "ms"),
    ("hb_rtt_p99_ms", "heartbeat RTT p99", "ms"),
    ("hb_answered_ratio", "heartbeats answered", ""),
    ("unexpected_disconnects", "unexpected disconnects", ""),
    ("gen_cpu_fraction", "generator CPU (total)", "core"),
    ("foreign_cpu_pct", "other processes' CPU", "% core"),
]
RUN_LINE_KEYS = ["connections_open", "connect_per_s", "rss_per_conn_kib", "relay_cpu_pct",
                 "hb_rtt_p95_ms"]


async def warm_up(url: str, token_for: TokenMinter | None, session_id: str) -> None:
    """Run one host + participant through hello, a heartbeat each and close (bounded)."""
    token = token_for.mint(session_id) if token_for else ""
    query = f"?session={session_id}" + (f"&token={token}" if token else "")
    heartbeat = bytes([1, 2, 0, 8, 0, 0, 0, 0]) + time.monotonic_ns().to_bytes(8, "big")
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        sockets = []
        for role in ("host", "participant"):
            ws = await http.ws_connect(url + query, autoping=True)
            sockets.append(ws)
            await ws.send_str(json.dumps({
                "type": "client_hello", "session_id": session_id, "role": role,
                "protocol_version": 1, "client_nonce": base64.b64encode(os.urandom(16)).decode(),
                "compression": ["none"], "peer_id": os.urandom(8).hex()}))
            await _receive(ws, aiohttp.WSMsgType.TEXT)
            await ws.send_bytes(heartbeat)
            await _receive(ws, aiohttp.WSMsgType.BINARY)
        for ws in sockets:
            await ws.close()


async def _receive(ws: aiohttp.ClientWebSocketResponse, wanted: aiohttp.WSMsgType) -> None:
    for _ in range(20):
        msg = await ws.receive(timeout=10)
        if msg.type == wanted:
            return
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR):
            raise ConnectionError(f"warm-up connection closed: {msg.data!r} {msg.extra!r}")
    raise ConnectionError(f"warm-up: no {wanted.name} message")


def idle_metrics(load: dict[str, Any], sampler: RelaySampler, rss_before: int) -> dict[str, Any]:
    """Derive the flat per-run metrics of an idle hold."""
    marks, window = sampler.marks, sampler.window()
    open_conns = load["connect"]["connections_ok"] - load["unexpected_disconnects"]
    hb = load["heartbeat"]
    connect = load["connect"]
    grown = marks["rss_end"] - rss_before
    connect_cpu = marks["cpu_connected"] - marks["cpu_before"]
    # the generators' CPU while connecting, of their CPUs: near 1, they set the connect rate
    gen_cores = len(load["config"]["gen_cpus"]) or os.cpu_count() or 1
    connect_gen = round(connect["generator_cpu_s"] / connect["span_s"] / gen_cores, 3) \
        if connect["span_s"] else None
    return {
        "connections_open": open_conns,
        "connections_failed": 2 * connect["sessions_failed"],
        "connect_per_s": connect["connections_per_s"],
        "connect_p95_ms": connect["latency_ms"]["p95"],
        "connect_gen_cpu_fraction": connect_gen,
        "connect_generator_bound": connect_gen is not None and connect_gen > CPU_BOUND_FRACTION,
        "connect_cpu_us": round(connect_cpu * 1e6 / connect["connections_ok"], 1)
        if connect["connections_ok"] else None,
        "rss_before_mib": round(rss_before / 2**20, 2),
        "rss_connected_mib": round(marks["rss_connected"] / 2**20, 2),
        "rss_held_mib": round(marks["rss_end"] / 2**20, 2),
        "rss_per_conn_kib": round(grown / open_conns / 1024, 2) if open_conns else None,
        "relay_cpu_pct": round(100 * window["relay_cpu_s"] / window["wall_s"], 2),
        "hb_sent": hb["sent"], "hb_answered": hb["delivered"],
        "hb_answered_ratio": hb["delivered_ratio"],
        "hb_rtt_p50_ms": hb["rtt_ms"]["p50"], "hb_rtt_p95_ms": hb["rtt_ms"]["p95"],
        "hb_rtt_p99_ms": hb["rtt_ms"]["p99"], "hb_rtt_max_ms": hb["rtt_ms"]["max"],
        "unexpected_disconnects": load["unexpected_disconnects"],
        "gen_cpu_fraction": load["generator"]["cpu_fraction_total"],
        "generator_bound": load["generator"]["generator_bound"],
        "foreign_cpu_pct": window["foreign_cpu_pct"],
        "contended": window["contended"],
    }


CONNECTIONS_PER_WORKER = 12_500
"""Connections per relay worker when ``--workers`` is automatic (its limit is 16,000)."""
SINGLE_PROCESS_LIMIT = 19_000
"""Connections above which a one-process relay (the naive baseline) cannot be run."""


def plan_relays(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Return ``--relays`` with ``rescue`` given its worker count, and notes on what changed.

    ``--workers 0`` picks one worker per 12,500 connections; the naive relay is dropped when
    the connections exceed what one process can hold.
    """
    workers = args.workers or -(-args.connections // CONNECTIONS_PER_WORKER)
    notes = []
    relays = []
    for name in (r.strip() for r in args.relays.split(",") if r.strip()):
        if name == "naive" and args.connections > SINGLE_PROCESS_LIMIT:
            notes.append(f"naive left out: one process cannot hold {args.connections} sockets "
                         f"(RLIMIT_NOFILE); no same-run baseline at this size")
        elif name == "rescue" and workers > 1:
            relays.append(f"rescue{workers}")
            notes.append(f"rescue runs with {workers} workers (rescue{workers})")
        else:
            relays.append(name)
    return ",".join(relays), notes


def measure(relay: RelayProcess, record: dict[str, Any], args: argparse.Namespace, *,
            key_dir: str, kid: str, gen_cpus: list[int], label: str) -> dict[str, Any]:
    """Warm up, then open, settle, hold and close ``args.connections`` idle connections."""
    minter = TokenMinter(key_dir, kid) if relay.spec.needs_token else None
    prefix = f"{label}-{relay.spec.name}"
    asyncio.run(warm_up(relay.url, minter, f"{prefix}-warmup"))
    time.sleep(1.0)
    rss_before = relay.rss_bytes()
    cfg = LoadConfig(
        url=relay.url, sessions=args.connections // 2, duration_s=args.hold,
        warmup_s=args.settle, ramp_sessions_per_s=args.connect_rate / 2, procs=args.procs,
        data_rate=0, input_rate=0, heartbeat_s=args.heartbeat, drain_s=3.0,
        connect_concurrency=args.connect_concurrency,
        token_keys=key_dir if minter else "", kid=kid if minter else "",
        gen_cpus=gen_cpus, session_prefix=prefix,
        source_addrs=loopback_sources(args.connections, args.source_addrs))
    record["source_addrs"] = cfg.source_addrs
    sampler = RelaySampler(relay)
    load = asyncio.run(run_load(cfg, sampler))
    record["load"] = load
    if not load["connect"]["sessions_ok"]:
        raise RuntimeError(f"no connection succeeded: {load['connect']['errors']}")
    time.sleep(2.0)
    record["rss_after_close_mib"] = round(relay.rss_bytes() / 2**20, 2)
    record["peak_rss_mib"] = round(relay.peak_rss_bytes() / 2**20, 2)
    return idle_metrics(load, sampler, rss_before)


def main() -> int:
    """Run the idle rounds, write the JSON result and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000,
                        help="idle connections to hold (N/2 sessions)")
    parser.add_argument("--hold", type=float, default=30.0, help="measured hold, seconds")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between the last hello and the hold")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="heartbeat period per connection, seconds")
    parser.add_argument("--connect-rate", type=float, default=0.0,
                        help="connections started per second (0: as fast as the concurrency "
                             "allows)")
    parser.add_argument("--connect-concurrency", type=int, default=64,
                        help="sessions connecting at once per generator process")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (0: enough for <= 8,000 sockets each)")
    parser.add_argument("--workers", type=int, default=0,
                        help="workers of the rescue relay (0: one per "
                             f"{CONNECTIONS_PER_WORKER:,} connections)")
    parser.add_argument("--source-addrs", type=int, default=-1,
                        help="loopback source addresses to spread connections over "
                             "(127.0.0.2, ...; -1: as many as needed, 0: none)")
    add_common_arguments(parser, with_gen_cpus=True)
    args = parser.parse_args()
    if args.quick:
        args.connections, args.hold, args.settle = 1000, 5.0, 1.0
    args.relays, notes = plan_relays(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    ctx = prepare(parser, args, default_runs=1)
    ctx.relay_lifetime_s = 300 + args.connections / 50 + args.settle + args.hold

    def run(relay_name: str, label: str) -> dict[str, Any]:
        return with_relay(ctx, relay_name, label,
                          lambda relay, record: measure(
                              relay, record, args, key_dir=ctx.key_dir, kid=ctx.kid,
                              gen_cpus=ctx.gen_cpus, label=label))

    records = alternate(ctx, run, RUN_LINE_KEYS)
    headline = (f"idle bench: {args.connections} connections held {args.hold:g} s, heartbeat "
                f"every {args.heartbeat:g} s, {ctx.runs} round(s)")
    return finish("idle", ctx, records, metrics=METRICS, line_keys=RUN_LINE_KEYS,
                  headline=headline, config={"quick": args.quick, "args": vars(args),
                                             "notes": notes})


if __name__ == "__main__":
    sys.exit(main())
