"""Pair-relay load generator: S sessions (host + participant) over several generator processes.

Each host streams ``data_bytes`` frames at ``data_rate`` per second (4 KiB at 16/s = 64 KB/s by
default), each payload starting with its 8-byte send time (``time.monotonic_ns``); participants
measure latency on arrival and send light input back (64 B at 2/s). Every connection also sends a
protocol heartbeat every ``heartbeat_s``. Sessions connect at a ramp rate, traffic warms up,
then the measured window of ``duration_s`` runs; senders stop at its end and a bounded drain
waits for frames in flight before anything is counted. The work of each process is in
:mod:`loadgen_worker`; this module starts, coordinates and merges them.

Standalone: ``python benches/loadgen.py --url ws://127.0.0.1:P/ws --sessions 50 --duration 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench_child import Child, kill_all, read_event, reap, send, spawn
from bench_host import parse_cpus, pin_self
from latency_histogram import Histogram

WORKER = Path(__file__).resolve().with_name("loadgen_worker.py")
MAX_SOCKETS_PER_PROC = 8000
CPU_BOUND_FRACTION = 0.85
LAG_BOUND_MS = 20.0
SCHEDULE_LAG_BOUND_MS = 10.0


@dataclass
class LoadConfig:
    """One load run: the traffic shape, the timeline and where the generators run."""

    url: str
    sessions: int = 1000
    duration_s: float = 20.0
    warmup_s: float = 5.0
    ramp_sessions_per_s: float = 500.0
    procs: int = 0
    data_rate: float = 16.0
    data_bytes: int = 4096
    input_rate: float = 2.0
    input_bytes: int = 64
    heartbeat_s: float = 15.0
    drain_s: float = 3.0
    connect_concurrency: int = 100
    connect_timeout_s: float = 10.0
    token_keys: str = ""
    kid: str = ""
    gen_cpus: list[int] = field(default_factory=lambda: [1])
    session_prefix: str = ""
    source_addrs: list[str] = field(default_factory=list)
    worker: str = ""  # generator script speaking this module's protocol; "": loadgen_worker
    worker_options: dict[str, Any] = field(default_factory=dict)  # extra config for it

    def resolved_procs(self) -> int:
        """Return the generator process count: as given, or enough for 8,000 sockets each."""
        if self.procs > 0:
            return min(self.procs, max(1, self.sessions))
        return max(1, math.ceil(2 * self.sessions / MAX_SOCKETS_PER_PROC))


class WindowObserver(Protocol):
    """Called by :func:`run_load` at the edges of the run (e.g. to sample the relay)."""

    def at_connected(self) -> None:
        """Every generator has finished connecting."""

    def at_window_start(self) -> None:
        """The measured window begins now."""

    def at_window_end(self) -> None:
        """The measured window ends now."""


async def _sleep_until(t_ns: int) -> None:
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


async def run_load(cfg: LoadConfig, observer: WindowObserver | None = None) -> dict[str, Any]:
    """Run one load and return the merged result (counts, latencies, generator health)."""
    procs_n = cfg.resolved_procs()
    prefix = cfg.session_prefix or f"bench{time.time_ns() % 10**12}"
    ramp_s = cfg.sessions / cfg.ramp_sessions_per_s if cfg.ramp_sessions_per_s > 0 else 0.0
    connect_phase_s = ramp_s + 60.0 + cfg.sessions / 100.0
    start_ns = time.monotonic_ns() + 1_500_000_000
    max_wall_s = (1.5 + connect_phase_s + cfg.warmup_s + cfg.duration_s + cfg.drain_s + 60)
    procs: list[Child] = []
    try:
        for index in range(procs_n):
            proc = await spawn(cfg.worker or WORKER, cfg.gen_cpus)
            procs.append(proc)
            await send(proc, {
                "url": cfg.url, "proc_index": index, "procs": procs_n,
                "total_sessions": cfg.sessions, "session_prefix": prefix, "start_ns": start_ns,
                "ramp_sessions_per_s": cfg.ramp_sessions_per_s,
                "connect_concurrency": cfg.connect_concurrency,
                "connect_timeout_s": cfg.connect_timeout_s,
                "connect_phase_timeout_s": connect_phase_s,
                "data_rate": cfg.data_rate, "data_bytes": cfg.data_bytes,
                "input_rate": cfg.input_rate, "input_bytes": cfg.input_bytes,
                "heartbeat_s": cfg.heartbeat_s, "drain_s": cfg.drain_s,
                "token_keys": cfg.token_keys, "kid": cfg.kid, "max_wall_s": max_wall_s,
                "source_addrs": cfg.source_addrs} | cfg.worker_options)
        connected = [await read_event(p, "connected", connect_phase_s + 30) for p in procs]
        if observer:
            observer.at_connected()
        t0 = time.monotonic_ns() + int(cfg.warmup_s * 1e9)
        t1 = t0 + int(cfg.duration_s * 1e9)
        for proc in procs:
            await send(proc, {"cmd": "window", "t0_ns": t0, "t1_ns": t1})
        await _sleep_until(t0)
        if observer:
            observer.at_window_start()
        await _sleep_until(t1)
        if observer:
            observer.at_window_end()
        results = [await read_event(p, "result", cfg.drain_s + 30) for p in procs]
        await reap(procs, 30)
        return merge_results(cfg, procs_n, connected, results, (t1 - t0) / 1e9)
    finally:
        await kill_all(procs)


def _flow(flows: list[dict[str, Any]], latency_name: str) -> dict[str, Any]:
    hist = Histogram()
    for f in flows:
        hist.merge(Histogram.from_json(f["latency_us"]))
    sent = sum(f["sent_in_window"] for f in flows)
    delivered = sum(f["delivered_in_window"] for f in flows)
    return {"sent": sent, "delivered": delivered,
            "delivered_ratio": delivered / sent if sent else None,
            "lost": sent - delivered,
            "received_in_window": sum(f["received_in_window"] for f in flows),
            "seq_gaps": sum(f["seq_gaps"] for f in flows),
            latency_name: hist.summary(scale=1000.0)}


def _merge_errors(events: list[dict[str, Any]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for event in events:
        for message, n in event.get("errors", {}).items():
            merged[message] = merged.get(message, 0) + n
    return merged


def merge_results(cfg: LoadConfig, procs_n: int, connected: list[dict[str, Any]],
                  results: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """Combine the per-process events into one result and judge whether the generators bound it."""
    connect_hist = Histogram()
    for c in connected:
        connect_hist.merge(Histogram.from_json(c["connect_us"]))
    ok = sum(c["sessions_ok"] for c in connected)
    firsts = [c["first_connect_ns"] for c in connected if c["first_connect_ns"]]
    lasts = [c["last_ready_ns"] for c in connected if c["last_ready_ns"]]
    connect_span_s = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    per_proc = []
    for r in results:
        per_proc.append({"pid": r["pid"], "data_sent": r["data"]["sent_in_window"],
                         "data_delivered": r["data"]["delivered_in_window"],
                         "input_sent": r["input"]["sent_in_window"],
                         "input_delivered": r["input"]["delivered_in_window"],
                         "drain_waited_s": round(r["drain_waited_s"], 3)})
    health = judge_generators(results, window_s, len(cfg.gen_cpus) if cfg.gen_cpus else 1)
    for row, judged in zip(per_proc, health["per_proc"], strict=True):
        row.update(judged)
    data = _flow([r["data"] for r in results], "latency_ms")
    inputs = _flow([r["input"] for r in results], "latency_ms")
    heartbeat = _flow([r["heartbeat"] for r in results], "rtt_ms")
    return {
        "config": asdict(cfg) | {"procs": procs_n},
        "window_s": window_s,
        "connect": {
            "sessions_ok": ok, "sessions_failed": sum(c["sessions_failed"] for c in connected),
            "connections_ok": 2 * ok, "span_s": round(connect_span_s, 3),
            "connections_per_s": round(2 * ok / connect_span_s, 1) if connect_span_s else None,
            "latency_ms": connect_hist.summary(scale=1000.0),
            "generator_cpu_s": round(sum(c["cpu_connect_s"] for c in connected), 3),
            "errors": _merge_errors(connected)},
        "data": data, "input": inputs, "heartbeat": heartbeat,
        "messages_relayed_in_window": data["received_in_window"] + inputs["received_in_window"],
        "bad_frames": sum(r["bad_frames"] for r in results),
        "unexpected_disconnects": sum(r["unexpected_disconnects"] for r in results),
        "errors": _merge_errors(results),
        "generator": health | {"procs": procs_n, "per_proc": per_proc},
    }


def judge_generators(results: list[dict[str, Any]], window_s: float,
                     gen_cores: int) -> dict[str, Any]:
    """Judge whether generator processes kept up; return their health and the verdict.

    Each result carries its window's ``cpu_s``, ``cpu_fraction``, ``lag_us`` (event-loop
    wake-up lag) and optionally ``schedule_lag_us`` (how late the timing wheel fired). A
    run is ``generator_bound`` when a process used more than 85 % of a core, all of them more
    than 85 % of their ``gen_cores``, the loop lag p99 exceeded 20 ms or the schedule lag p95
    exceeded 10 ms; ``reasons`` says which.
    """
    lag_all, sched_all = Histogram(), Histogram()
    per_proc, reasons = [], []
    for r in results:
        lag = Histogram.from_json(r["lag_us"])
        sched = Histogram.from_json(r["schedule_lag_us"]) if r.get("schedule_lag_us") \
            else Histogram()
        lag_all.merge(lag)
        sched_all.merge(sched)
        lag_p99 = (lag.percentile(99) or 0) / 1000.0
        sched_p95 = (sched.percentile(95) or 0) / 1000.0
        frac = r["cpu_fraction"] or 0.0
        per_proc.append({"cpu_fraction": round(frac, 3), "lag_p99_ms": lag_p99,
                         "lag_max_ms": lag.max / 1000.0, "schedule_lag_p95_ms": sched_p95,
                         "schedule_lag_max_ms": sched.max / 1000.0})
        name = f"generator {r.get('proc', len(per_proc) - 1)}"
        if frac > CPU_BOUND_FRACTION:
            reasons.append(f"{name} used {frac:.0%} of a core")
        if lag_p99 > LAG_BOUND_MS:
            reasons.append(f"{name} loop lag p99 {lag_p99:.1f} ms")
        if sched_p95 > SCHEDULE_LAG_BOUND_MS:
            reasons.append(f"{name} timing wheel fired late, p95 {sched_p95:.1f} ms")
    total_frac = (sum(r["cpu_s"] for r in results) / window_s / max(1, gen_cores)
                  if window_s else 0.0)
    if total_frac > CPU_BOUND_FRACTION and len(results) > 1:
        reasons.append(f"generators together used {total_frac:.0%} of their cores")
    return {"cpu_s": round(sum(r["cpu_s"] for r in results), 4),
            "cpu_fraction_total": round(total_frac, 3),
            "lag_ms": lag_all.summary(scale=1000.0),
            "schedule_lag_ms": sched_all.summary(scale=1000.0),
            "per_proc": per_proc, "generator_bound": bool(reasons), "reasons": reasons}


def add_load_arguments(parser: argparse.ArgumentParser, *, sessions: int, duration: float,
                       warmup: float) -> None:
    """Add the traffic-shape options shared by ``loadgen`` and ``relay_bench``."""
    parser.add_argument("--sessions", type=int, default=sessions)
    parser.add_argument("--duration", type=float, default=duration,
                        help="measured window, seconds")
    parser.add_argument("--warmup", type=float, default=warmup,
                        help="seconds of traffic after connecting, excluded from stats")
    parser.add_argument("--ramp", type=float, default=500.0,
                        help="sessions started per second (0: as fast as possible)")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (0: enough for <= 8,000 sockets each)")
    parser.add_argument("--data-rate", type=float, default=16.0, help="host frames/s")
    parser.add_argument("--data-bytes", type=int, default=4096, help="host payload bytes")
    parser.add_argument("--input-rate", type=float, default=2.0,
                        help="participant frames/s (0: none)")
    parser.add_argument("--input-bytes", type=int, default=64)
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="protocol heartbeat period per connection, s (0: none)")
    parser.add_argument("--drain", type=float, default=3.0,
                        help="max seconds to wait for frames in flight after the window")
    parser.add_argument("--gen-cpus", default="1", help="CPUs for generators ('' = any)")


def load_config_from_args(args: argparse.Namespace, url: str) -> LoadConfig:
    """Build a :class:`LoadConfig` from the options of :func:`add_load_arguments`."""
    return LoadConfig(
        url=url, sessions=args.sessions, duration_s=args.duration, warmup_s=args.warmup,
        ramp_sessions_per_s=args.ramp, procs=args.procs, data_rate=args.data_rate,
        data_bytes=args.data_bytes, input_rate=args.input_rate, input_bytes=args.input_bytes,
        heartbeat_s=args.heartbeat, drain_s=args.drain, gen_cpus=parse_cpus(args.gen_cpus))


def main() -> None:
    """Run one load against ``--url`` and print the merged result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/ws")
    parser.add_argument("--token-keys", default="", help="directory with <kid>.key")
    parser.add_argument("--kid", default="", help="key id to sign tokens with")
    add_load_arguments(parser, sessions=50, duration=5.0, warmup=2.0)
    args = parser.parse_args()
    cfg = load_config_from_args(args, args.url)
    cfg.token_keys, cfg.kid = args.token_keys, args.kid
    pin_self(cfg.gen_cpus)
    result = asyncio.run(run_load(cfg))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
