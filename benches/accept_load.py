"""Accept-rate load: several :mod:`accept_load_worker` processes open connections back to back.

:func:`run_accept_load` starts the processes (pinned to the generator CPUs), lets each mint
its tokens, fixes a common timeline (warm-up, then the measured window), samples the relay's
CPU at the window's edges through the caller's callbacks, and merges the results: connections
that completed upgrade + hello inside the window per second, latency, failures, and the
generators' own CPU (to tell whether they were the bottleneck).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_child import Child, kill_all, read_event, reap, send, spawn
from latency_histogram import Histogram

WORKER = Path(__file__).resolve().with_name("accept_load_worker.py")
CPU_BOUND_FRACTION = 0.85


@dataclass
class AcceptLoad:
    """One accept-rate run."""

    port: int
    token_keys: str
    kid: str
    session_prefix: str
    procs: int = 4
    connections_per_proc: int = 5000
    concurrency: int = 32
    warmup_s: float = 0.5
    duration_s: float = 5.0
    gen_cpus: list[int] = field(default_factory=lambda: [1])


async def run_accept_load(load: AcceptLoad, at_window_start: Callable[[], None],
                          at_window_end: Callable[[], None]) -> dict[str, Any]:
    """Run the load; call the callbacks at the window's edges; return the merged result."""
    procs: list[Child] = []
    max_wall_s = 90 + load.warmup_s + load.duration_s
    try:
        for index in range(load.procs):
            proc = await spawn(WORKER, load.gen_cpus)
            procs.append(proc)
            await send(proc, {"host": "127.0.0.1", "port": load.port, "proc_index": index,
                               "session_prefix": load.session_prefix,
                               "token_keys": load.token_keys, "kid": load.kid,
                               "connections": load.connections_per_proc,
                               "concurrency": load.concurrency, "max_wall_s": max_wall_s})
        ready = [await read_event(p, "ready", 60) for p in procs]
        start_ns = time.monotonic_ns() + 200_000_000
        t0 = start_ns + int(load.warmup_s * 1e9)
        t1 = t0 + int(load.duration_s * 1e9)
        for proc in procs:
            await send(proc, {"cmd": "go", "start_ns": start_ns, "t0_ns": t0, "t1_ns": t1})
        await asyncio.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
        at_window_start()
        await asyncio.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
        at_window_end()
        results = [await read_event(p, "result", 30) for p in procs]
        await reap(procs, 20)
        return merge(load, ready, results)
    finally:
        await kill_all(procs)


def merge(load: AcceptLoad, ready: list[dict[str, Any]],
          results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the per-process results; judge whether the generators were the bottleneck."""
    hist = Histogram()
    failures: dict[str, int] = {}
    for r in results:
        hist.merge(Histogram.from_json(r["latency_us"]))
        for reason, n in r["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
    completed = sum(r["completed_in_window"] for r in results)
    cpu_s = sum(r["cpu_s"] for r in results)
    gen_cores = len(load.gen_cpus) if load.gen_cpus else 2
    fraction = cpu_s / load.duration_s / gen_cores
    reasons = []
    if fraction > CPU_BOUND_FRACTION:
        reasons.append(f"generators used {fraction:.0%} of their {gen_cores} CPU(s)")
    exhausted = [r["proc"] for r in results if r["exhausted"]]
    if exhausted:
        reasons.append(f"generators {exhausted} ran out of prepared connections")
    return {
        "config": asdict(load),
        "completed_in_window": completed,
        "connections_per_s": round(completed / load.duration_s, 1),
        "completed_total": sum(r["completed_total"] for r in results),
        "latency_ms": hist.summary(scale=1000.0),
        "failures": failures,
        "generator": {"cpu_s": round(cpu_s, 3), "cpu_fraction_total": round(fraction, 3),
                      "per_proc_cpu_fraction": [round(r["cpu_fraction"] or 0, 3)
                                                for r in results],
                      "prepare_s": [round(r["prepare_s"], 2) for r in ready],
                      "generator_bound": bool(reasons), "reasons": reasons},
    }
