"""What the multi-worker benches share: a rescue relay with its admin listener, and its workers.

:func:`with_rescue` is :func:`bench_runner.with_relay` for any ``rescue*`` relay (``rescue``
with one worker, ``rescue2`` with two): it passes the bench's relay environment to each of them
(``with_relay`` passes it to ``rescue`` only), turns on the admin listener on a free port with a
random key, and gives every relay its own prometheus multiprocess directory (so two relays on
the machine never empty each other's). :func:`admin_stats` reads ``/debug/stats``;
:func:`intake_totals` sums the intake counters of every worker in the supervisor's table;
:func:`worker_processes` finds the workers by their process titles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psutil
from bench_host import free_port
from bench_runner import BenchContext, note_failure
from relay_process import RelayProcess, relay_spec

INTAKE_KEYS = ("accepted", "handed_off", "adopted", "handoff_failures")
_HANDOFF_LINE = re.compile(r'^beach_rescue_handoffs_total\{[^}]*event="([a-z_]+)"[^}]*\} '
                           r'([0-9.e+]+)$', re.MULTILINE)


class RescueRelay:
    """A started rescue relay with the address and key of its admin listener."""

    def __init__(self, process: RelayProcess, admin_port: int, admin_key: str) -> None:
        self.process = process
        self.admin_port = admin_port
        self.admin_key = admin_key

    @property
    def port(self) -> int:
        """The public port."""
        return self.process.port

    def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Return ``/debug/stats`` from whichever worker accepts the request."""
        return admin_stats(self.admin_port, self.admin_key, timeout_s)

    def settled_stats(self, wait_s: float = 3.0) -> dict[str, Any]:
        """Return ``/debug/stats`` after ``wait_s``: the supervisor's table of every worker's
        numbers comes from their once-a-second beats and is broadcast once a second, so it
        lags by up to about two seconds.
        """
        time.sleep(wait_s)
        return self.stats()

    def handoff_counters(self, timeout_s: float = 5.0) -> dict[str, float]:
        """Return ``beach_rescue_handoffs_total`` by ``event`` (out, in, failed, retried, ...)
        from ``/metrics``: the node's sum over every worker, dead ones included."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/metrics")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for match in _HANDOFF_LINE.finditer(text):
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
        return out

    def workers(self) -> dict[int, psutil.Process]:
        """Return the live worker processes by slot."""
        return worker_processes(self.process)


def runtime_s(pid: int) -> float:
    """Return the CPU time of every thread of ``pid`` so far, from ``/proc/<pid>/task/*/schedstat``
    (nanoseconds, unlike the 10 ms ticks of ``/proc/<pid>/stat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def tree_runtime_s(relay: RelayProcess) -> float:
    """Return the CPU seconds of the relay's live process tree, at nanosecond resolution."""
    total = 0.0
    for proc in relay.tree():
        with contextlib.suppress(OSError):
            total += runtime_s(proc.pid)
    return total


def admin_stats(port: int, key: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET ``/debug/stats`` on the admin listener with the bearer ``key``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/debug/stats",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body: dict[str, Any] = json.load(response)
        return body


def intake_totals(stats: dict[str, Any]) -> dict[str, int]:
    """Sum accepted / handed_off / adopted / handoff_failures over the ``workers`` table.

    Falls back to the answering worker's own ``intake`` when the table is empty (it is
    filled from the first beats, a second or two after start).
    """
    rows = stats.get("workers") or []
    if not rows and stats.get("intake"):
        rows = [stats["intake"]]
    return {key: sum(int(row.get(key, 0) or 0) for row in rows) for key in INTAKE_KEYS}


def intake_by_slot(stats: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Return each live worker's intake counters by slot (from the ``workers`` table)."""
    return {int(row["slot"]): {key: int(row.get(key, 0) or 0) for key in INTAKE_KEYS}
            for row in stats.get("workers") or [] if row.get("slot") is not None}


def intake_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Return the intake counters between two snapshots and the handed-off fraction."""
    delta: dict[str, Any] = {key: after.get(key, 0) - before.get(key, 0) for key in INTAKE_KEYS}
    accepted = delta["accepted"]
    delta["handoff_fraction"] = round(delta["handed_off"] / accepted, 4) if accepted else None
    return delta


def worker_processes(relay: RelayProcess) -> dict[int, psutil.Process]:
    """Return the relay's worker processes by slot, from their titles
    (``beach-rescue worker <slot> gen <generation>``); the newest generation wins a slot."""
    found: dict[int, tuple[int, psutil.Process]] = {}
    for proc in relay.tree():
        with contextlib.suppress(psutil.Error):
            words = " ".join(proc.cmdline()).split()
            if words[:2] == ["beach-rescue", "worker"] and len(words) >= 5:
                slot, generation = int(words[2]), int(words[4])
                if slot not in found or found[slot][0] < generation:
                    found[slot] = (generation, proc)
    return {slot: proc for slot, (_gen, proc) in sorted(found.items())}


def wait_for_workers(relay: RelayProcess, count: int, timeout_s: float = 30.0) -> None:
    """Wait until ``count`` workers are up (a relay is healthy when one of them answers)."""
    deadline = time.monotonic() + timeout_s
    while len(worker_processes(relay)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(worker_processes(relay))} of {count} workers "
                               f"after {timeout_s:.0f}s")
        time.sleep(0.05)


def wait_for_table(relay: RescueRelay, count: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """Return ``/debug/stats`` once the supervisor's table lists ``count`` serving workers."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = relay.stats()
        serving = [w for w in stats.get("workers") or [] if w.get("state") == "serving"]
        if len(serving) >= count:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers table lists {len(serving)} of {count} serving "
                               f"workers after {timeout_s:.0f}s")
        time.sleep(0.2)


def start_rescue(ctx: BenchContext, relay_name: str, label: str, *,
                 cpus: list[int] | None = None,
                 extra_env: dict[str, str] | None = None) -> RescueRelay:
    """Start a ``rescue*`` relay with an admin listener; wait for health and all workers."""
    spec = relay_spec(relay_name)
    if not spec.name.startswith("rescue"):
        raise ValueError(f"{relay_name} is not a rescue relay")
    if not ctx.kid:
        raise RuntimeError(f"no signing key: {ctx.key_error}")
    admin_port, admin_key = free_port(), secrets.token_hex(16)
    metrics_dir = ctx.work_dir / f"metrics-{label}-{relay_name}"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env = dict(ctx.relay_env)
    env.update({"BEACH_RESCUE_ADMIN_PORT": str(admin_port),
                "BEACH_RESCUE_ADMIN_KEY": admin_key,
                "BEACH_RESCUE_METRICS_DIR": str(metrics_dir)})
    env.update(extra_env or {})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = RelayProcess(spec, free_port(), cpus=ctx.relay_cpus if cpus is None else cpus,
                           key_dir=ctx.key_dir,
                           log_path=ctx.work_dir / f"{label}-{relay_name}.log", env=env,
                           lifetime_s=ctx.relay_lifetime_s)
    try:
        process.wait_healthy()
        wait_for_workers(process, spec.workers)
    except BaseException:
        process.stop()
        raise
    return RescueRelay(process, admin_port, admin_key)


def with_rescue(ctx: BenchContext, relay_name: str, label: str,
                body: Callable[[RescueRelay, dict[str, Any]], dict[str, Any]], *,
                cpus: list[int] | None = None,
                extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a rescue relay, call ``body(relay, record)``, always stop it; return the record.

    The record has ``ok``, ``metrics`` (what ``body`` returned) and, on any failure,
    ``error``, a short traceback and the tail of the relay's log.
    """
    record: dict[str, Any] = {"relay": relay_name, "ok": False,
                              "workers": relay_spec(relay_name).workers}
    relay: RescueRelay | None = None
    started = time.monotonic()
    try:
        relay = start_rescue(ctx, relay_name, label, cpus=cpus, extra_env=extra_env)
        record["port"] = relay.port
        record["healthy_after_s"] = round(time.monotonic() - started, 3)
        record["metrics"] = body(relay, record)
        record["processes"] = relay.process.processes()
        record["ok"] = True
    except Exception as e:
        note_failure(record, e)
        log = ctx.work_dir / f"{label}-{relay_name}.log"
        with contextlib.suppress(OSError):
            record["relay_log_tail"] = "\n".join(
                log.read_text(errors="replace").strip().splitlines()[-15:])
    finally:
        if relay is not None:
            record["exit_status"] = relay.process.stop()
    return record

