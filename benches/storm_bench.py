"""Reconnect storm: SIGKILL the worker holding 2,000 peers; time until every session is paired.

``python benches/storm_bench.py [--victim-sessions 1000] [--bystander-sessions 250] [--runs 3]
[--quick]``

Each round starts ``rescue2`` (supervisor + 2 workers) and connects, from ``--procs`` generator
processes (:mod:`storm_worker`), ``--victim-sessions`` sessions that worker slot 0 owns (the
relay's own ring decides; a host and a participant each: 2,000 peers by default, all served by
worker 0 whichever listener accepted them) and ``--bystander-sessions`` that slot 1 owns. When
every session is paired (the host got a marker frame from its participant), the bench SIGKILLs
worker 0 (found by its title, ``beach-rescue worker 0 gen 1``). Every dropped peer reconnects
with its own token and ``peer_id``, exponential backoff with full jitter (base 50 ms, cap 2 s),
until the supervisor's replacement worker serves it; hand-offs to the restarting worker wait in
its inbox. Measured from the kill: when each session is paired again (the host receives a
marker its participant sent after both rejoined), each peer's reconnect time, failed attempts by
reason (HTTP 503 ...; every peer must end connected), the relay's CPU sampled every
``--sample-ms`` (peak and mean, supervisor + workers), and whether any bystander session was
disturbed. A final check pairs every session once more. Results:
``benches/results/storm-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import zlib
from typing import Any

import psutil
from bench_child import Child, kill_all, read_event, reap, send, spawn
from bench_host import ForeignCpu
from bench_report import Metric, run_lines, summarize, summary_table, write_result
from bench_runner import (
    BenchContext,
    add_common_arguments,
    alternate,
    prepare,
    result_header,
)
from handoff_probe import percentile
from multiworker_runner import (
    RescueRelay,
    intake_by_slot,
    runtime_s,
    wait_for_table,
    with_rescue,
)

from rescue.ring import Ring

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storm_worker.py")
METRICS: list[Metric] = [
    ("all_paired_s", "kill -> every session paired again", "s"),
    ("worker_back_s", "kill -> replacement worker forked", "s"),
    ("paired_p50_s", "kill -> session paired p50", "s"),
    ("paired_p95_s", "kill -> session paired p95", "s"),
    ("back_p50_s", "kill -> peer reconnected p50", "s"),
    ("back_p95_s", "kill -> peer reconnected p95", "s"),
    ("back_max_s", "kill -> peer reconnected max", "s"),
    ("drop_to_back_p50_s", "drop -> reconnected p50", "s"),
    ("drop_to_back_p95_s", "drop -> reconnected p95", "s"),
    ("drop_to_back_max_s", "drop -> reconnected max", "s"),
    ("backoff_p50_ms", "backoff delay drawn p50", "ms"),
    ("backoff_p95_ms", "backoff delay drawn p95", "ms"),
    ("backoff_max_ms", "backoff delay drawn max", "ms"),
    ("peers_dropped", "peers dropped", ""),
    ("peers_not_back", "peers not back at the end", ""),
    ("sessions_repaired", "sessions paired again", ""),
    ("failed_reconnects", "failed reconnects (peers or sessions not back; must be 0)", ""),
    ("failed_attempts", "refused attempts, retried (503 ...)", ""),
    ("attempts", "reconnect attempts", ""),
    ("bystanders_dropped", "bystander sessions dropped", ""),
    ("w1_handed_off", "worker 1: handed to worker 0's inbox", ""),
    ("w1_handoff_failures", "worker 1: hand-offs refused (inbox full, 503)", ""),
    ("new_w0_adopted", "replacement worker 0: adopted", ""),
    ("handoff_retries", "hand-off retries while worker 0's inbox was full", ""),
    ("peak_relay_cpu_cores", "peak relay CPU", "cores"),
    ("mean_relay_cpu_cores", "mean relay CPU, kill -> all paired", "cores"),
    ("verified_sessions", "sessions paired in the final check", ""),
    ("foreign_cpu_pct", "other processes' CPU", "% core"),
]
RUN_LINE_KEYS = ["all_paired_s", "back_p95_s", "failed_reconnects", "failed_attempts",
                 "peak_relay_cpu_cores", "verified_sessions"]


class CpuSampler(threading.Thread):
    """Samples the relay tree's CPU every ``interval_s`` (per pid, so a killed or new worker
    does not distort a delta); notes when a new slot-0 worker appears."""

    def __init__(self, relay: RescueRelay, interval_s: float, old_worker0: int) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.interval_s = interval_s
        self.old_worker0 = old_worker0
        self.samples: list[tuple[int, float]] = []  # (monotonic_ns at end, cores)
        self.new_worker0_ns = 0
        self.stop_flag = threading.Event()
        self._last: dict[int, float] = {}
        self._known: set[int] = set()

    def _cpu(self) -> dict[int, float]:
        out = {}
        for p in self.relay.process.tree():
            with contextlib.suppress(psutil.Error, OSError):
                out[p.pid] = runtime_s(p.pid)
                if p.pid not in self._known:
                    self._known.add(p.pid)
                    title = " ".join(p.cmdline())
                    if title.startswith("beach-rescue worker 0 ") and p.pid != self.old_worker0 \
                            and not self.new_worker0_ns:
                        self.new_worker0_ns = time.monotonic_ns()
        return out

    def run(self) -> None:
        """Sample until stopped."""
        self._known.update(p.pid for p in self.relay.process.tree())
        self._last = self._cpu()
        last_ns = time.monotonic_ns()
        while not self.stop_flag.wait(self.interval_s):
            now_cpu = self._cpu()
            now_ns = time.monotonic_ns()
            used = sum(cpu - self._last.get(pid, 0.0) for pid, cpu in now_cpu.items())
            self.samples.append((now_ns, used / ((now_ns - last_ns) / 1e9)))
            self._last, last_ns = now_cpu, now_ns


def session_sets(prefix: str, victims: int, bystanders: int) -> list[tuple[str, str]]:
    """Return ``victims`` sessions slot 0 owns and ``bystanders`` slot 1 owns (2 workers)."""
    ring = Ring(range(2))
    out: list[tuple[str, str]] = []
    need = {0: victims, 1: bystanders}
    i = 0
    while any(need.values()):
        sid = f"{prefix}-{i}"
        i += 1
        owner = ring.owner(sid)
        if need[owner]:
            need[owner] -= 1
            out.append((sid, "victim" if owner == 0 else "bystander"))
    return out


def _s(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


async def storm(relay: RescueRelay, record: dict[str, Any], ctx: BenchContext,
                args: argparse.Namespace, label: str) -> dict[str, Any]:
    """One round: connect, pair, kill worker 0, wait for the storm to settle, verify."""
    sessions = session_sets(label, args.victim_sessions, args.bystander_sessions)
    procs: list[Child] = []
    sampler: CpuSampler | None = None
    try:
        for index in range(args.procs):
            proc = await spawn(WORKER, ctx.gen_cpus, limit=2**26)
            procs.append(proc)
            await send(proc, {
                "host": "127.0.0.1", "port": relay.port, "proc_index": index,
                "sessions": [list(s) for s in sessions[index::args.procs]],
                "token_keys": ctx.key_dir, "kid": ctx.kid,
                "backoff_base_s": args.backoff_base, "backoff_cap_s": args.backoff_cap,
                "storm_timeout_s": args.storm_timeout,
                "seed": zlib.crc32(f"{label}-{index}".encode()),
                "max_wall_s": 240 + args.storm_timeout})
        ready = [await read_event(p, "ready", 120) for p in procs]
        record["ready"] = ready
        if not all(r["all_paired"] for r in ready):
            raise RuntimeError(f"not every session paired before the kill: {ready}")
        wait_for_table(relay, 2)
        before = intake_by_slot(relay.settled_stats(args.settle))
        handoffs_before = relay.handoff_counters()
        worker0 = relay.workers()[0]
        record["killed"] = {"pid": worker0.pid, "title": " ".join(worker0.cmdline())}
        foreign = ForeignCpu()
        sampler = CpuSampler(relay, args.sample_ms / 1000, worker0.pid)
        sampler.start()
        await asyncio.sleep(0.3)  # a few samples before the kill
        # The killed worker's CPU so far leaves the tree with it; without this the foreign-CPU
        # probe would count it as other processes' work.
        dying = worker0.cpu_times()
        foreign.own0 -= dying.user + dying.system
        kill_ns = time.monotonic_ns()
        os.kill(worker0.pid, signal.SIGKILL)
        for proc in procs:
            await send(proc, {"cmd": "storm", "kill_ns": kill_ns})
        done = [await read_event(p, "storm_done", args.storm_timeout + 30) for p in procs]
        storm_wall = (time.monotonic_ns() - kill_ns) / 1e9
        foreign_pct = round(100 * foreign.seconds() / (storm_wall + 0.3), 1)
        sampler.stop_flag.set()
        sampler.join(5)
        for proc in procs:
            await send(proc, {"cmd": "verify", "timeout_s": 15})
        verified = [await read_event(p, "verified", 30) for p in procs]
        stats = relay.settled_stats()
        record["workers_table"] = stats.get("workers")
        after = intake_by_slot(stats)
        handoffs_after = relay.handoff_counters()
        record["handoff_counters"] = {
            event: handoffs_after.get(event, 0.0) - handoffs_before.get(event, 0.0)
            for event in handoffs_after}
        # The killed worker's counters died with it; worker 1's are continuous, and the
        # replacement worker 0 counts from its start.
        record["intake"] = {
            "worker1": {k: after.get(1, {}).get(k, 0) - before.get(1, {}).get(k, 0)
                        for k in before.get(1, {})},
            "new_worker0": after.get(0, {})}
        for proc in procs:
            await send(proc, {"cmd": "close"})
        await reap(procs, 20)
        return storm_metrics(record, done, verified, sampler, kill_ns=kill_ns,
                             foreign_pct=foreign_pct)
    finally:
        if sampler is not None:
            sampler.stop_flag.set()
        await kill_all(procs)


def storm_metrics(record: dict[str, Any], done: list[dict[str, Any]],
                  verified: list[dict[str, Any]], sampler: CpuSampler, *, kill_ns: int,
                  foreign_pct: float) -> dict[str, Any]:
    """Merge the generators' storm reports and the CPU samples into the run's metrics."""
    paired = [v for d in done for v in d["paired_after_kill_ms"]]
    backoff = [v for d in done for v in d["backoff_ms"]]
    back = [v for d in done for v in d["back_after_kill_ms"]]
    drop_to_back = [v for d in done for v in d["back_after_drop_ms"]]
    failures: dict[str, int] = {}
    for d in done:
        for reason, n in d["failed_attempts"].items():
            failures[reason] = failures.get(reason, 0) + n
    all_paired_ms = max(paired) if paired else None
    end_ns = kill_ns + int((all_paired_ms or 0) * 1e6)
    during = [cores for t, cores in sampler.samples if kill_ns < t <= end_ns + sampler.interval_s
              * 1e9]
    record["storm"] = {
        "failed_attempts_by_reason": failures,
        "cpu_samples": [(round((t - kill_ns) / 1e6, 1), round(c, 3)) for t, c in sampler.samples],
        "per_proc": [{k: v for k, v in d.items() if not k.endswith("_ms")} for d in done],
        "victims": sum(d["victims"] for d in done),
        "victims_dropped": sum(d["victims_dropped"] for d in done),
        "sessions_dropped": sum(d["sessions_dropped"] for d in done),
        "reconnects_per_peer_max": max(d["reconnects_per_peer_max"] for d in done),
    }
    worker_back = (sampler.new_worker0_ns - kill_ns) / 1e9 if sampler.new_worker0_ns else None
    return {
        "all_paired_s": _s(all_paired_ms),
        "worker_back_s": round(worker_back, 3) if worker_back is not None else None,
        "paired_p50_s": _s(percentile(paired, 50)), "paired_p95_s": _s(percentile(paired, 95)),
        "back_p50_s": _s(percentile(back, 50)), "back_p95_s": _s(percentile(back, 95)),
        "back_max_s": _s(max(back) if back else None),
        "drop_to_back_p50_s": _s(percentile(drop_to_back, 50)),
        "drop_to_back_p95_s": _s(percentile(drop_to_back, 95)),
        "drop_to_back_max_s": _s(max(drop_to_back) if drop_to_back else None),
        "backoff_p50_ms": percentile(backoff, 50), "backoff_p95_ms": percentile(backoff, 95),
        "backoff_max_ms": max(backoff) if backoff else None, "backoff_draws": len(backoff),
        "peers_dropped": sum(d["peers_dropped"] for d in done),
        "peers_not_back": sum(d["peers_not_back"] for d in done),
        "sessions_repaired": sum(d["sessions_repaired"] for d in done),
        "failed_attempts": sum(failures.values()),
        "attempts": sum(d["attempts"] for d in done),
        "bystanders_dropped": sum(d["bystanders_dropped"] for d in done),
        "w1_handed_off": record["intake"]["worker1"].get("handed_off"),
        "w1_handoff_failures": record["intake"]["worker1"].get("handoff_failures"),
        "new_w0_adopted": record["intake"]["new_worker0"].get("adopted"),
        "handoff_retries": record["handoff_counters"].get("retried", 0.0),
        "peak_relay_cpu_cores": round(max(during), 3) if during else None,
        "mean_relay_cpu_cores": round(sum(during) / len(during), 3) if during else None,
        "verified_sessions": sum(v["sessions_paired"] for v in verified),
        "foreign_cpu_pct": foreign_pct, "contended": foreign_pct > 10.0,
    } | verdict(record["storm"], done, verified)


def verdict(storm: dict[str, Any], done: list[dict[str, Any]],
            verified: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge a round: every peer back, every dropped session paired again, every session
    paired in the final check. ``failed_reconnects`` counts the peers and sessions that were
    not (it must be 0: the round failed otherwise); refused attempts that a retry mended are
    counted apart (``failed_attempts``)."""
    not_back = sum(d["peers_not_back"] for d in done)
    not_repaired = sum(d["sessions_dropped"] - d["sessions_repaired"] for d in done)
    not_dropped = storm["victims"] - storm["victims_dropped"]
    not_verified = sum(v["sessions"] - v["sessions_paired"] for v in verified)
    why = [f"{n} {what}" for n, what in (
        (not_back, "peers not back"), (not_repaired, "dropped sessions not paired again"),
        (not_dropped, "victim sessions never dropped (the kill missed them)"),
        (not_verified, "sessions not paired in the final check")) if n]
    return {"failed_reconnects": not_back + not_repaired, "all_back": not (not_back
                                                                          or not_repaired
                                                                          or not_dropped),
            "all_verified": not not_verified, "round_failed": "; ".join(why) or None}


def main() -> int:
    """Run the storm rounds, write the JSON result and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victim-sessions", type=int, default=1000,
                        help="sessions owned by worker 0 (2 peers each), killed")
    parser.add_argument("--bystander-sessions", type=int, default=250,
                        help="sessions owned by worker 1, which must not notice")
    parser.add_argument("--procs", type=int, default=4, help="generator processes")
    parser.add_argument("--backoff-base", type=float, default=0.05)
    parser.add_argument("--backoff-cap", type=float, default=2.0)
    parser.add_argument("--storm-timeout", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between all paired and the kill (the workers table "
                             "catches up meanwhile)")
    parser.add_argument("--sample-ms", type=float, default=100.0,
                        help="relay CPU sampling interval")
    add_common_arguments(parser, with_gen_cpus=True)
    parser.set_defaults(relays="rescue2")
    args = parser.parse_args()
    if args.quick:
        args.victim_sessions, args.bystander_sessions = 100, 25
    ctx = prepare(parser, args, default_runs=3)
    if ctx.relays != ["rescue2"]:
        parser.error("the storm bench runs rescue2 only")

    def run(relay_name: str, label: str) -> dict[str, Any]:
        return with_rescue(ctx, relay_name, label,
                           lambda relay, record: asyncio.run(storm(relay, record, ctx, args,
                                                                   label)))

    records = alternate(ctx, run, RUN_LINE_KEYS)
    summary = summarize(records, ctx.relays, METRICS)
    counted = [r for r in records if r.get("ok") and not r.get("discarded")]
    failed_rounds = [f"round {r['round']}: {r['metrics']['round_failed']}" for r in counted
                     if r["metrics"]["round_failed"]]
    all_good = bool(counted) and not failed_rounds
    pinning = (f"relay tree (supervisor + both workers) on CPU(s) {ctx.relay_cpus or 'any'}, "
               f"generators on CPU(s) {ctx.gen_cpus or 'any'}")
    payload = result_header("storm", ctx, {"args": vars(args), "pinning": pinning}) | {
        "summary": summary, "all_back_and_paired_every_round": all_good,
        "failed_rounds": failed_rounds,
        "contended": any(r["metrics"].get("contended") for r in counted),
        "runs": records}
    path = write_result("storm", payload)
    print(f"\nstorm bench: {2 * args.victim_sessions} peers ({args.victim_sessions} sessions) "
          f"on worker 0 SIGKILLed, {args.bystander_sessions} bystander sessions on worker 1, "
          f"{ctx.runs} round(s); backoff full jitter base {args.backoff_base * 1000:g} ms cap "
          f"{args.backoff_cap:g} s\npinning: {pinning}")
    print(run_lines(records, RUN_LINE_KEYS))
    print()
    print(summary_table(summary, ctx.relays, METRICS))
    print(f"\nevery dropped peer back and every session paired, in every round: {all_good}")
    for line in failed_rounds:
        print(f"FAILED {line}")
    if payload["contended"]:
        print("WARNING: contended: other processes used more than 10 % of a core in a run")
    print(f"results: {path}")
    failed = [r for r in records if not r.get("ok")]
    if failed:
        print(f"{len(failed)} run(s) failed; relay logs kept in {ctx.work_dir}")
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
