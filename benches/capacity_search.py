"""Capacity search of the active bench: step the session count up until a run no longer holds.

A run *holds* when every session connected, no data or input frame was lost (delivered = sent,
no sequence gaps, no unexpected disconnect), the data latency p95 stayed below the limit (40 ms)
and the generator kept up (not ``generator_bound``). For each relay the search starts at
``start`` sessions and multiplies by ``factor`` while runs hold; after the first run that does
not hold it bisects between the largest S that held and the smallest that did not, at most
``refine`` times and only while the gap is over 10 %. Relays take turns step by step, so slow
drifts of the machine hit both; the whole search is bounded by ``max_sessions`` and
``max_time_s``. When even the first step does not hold, S is halved (down to 25 sessions, a few
times) so that a per-core figure exists at all.

The measured capacity is the largest S that held. Because two cores hold relay and generator
together, the search usually ends with the generator, not the relay, at its limit; the
extrapolated per-core capacity (S held / relay CPU cores used at S) and the cores a 5,000-session
run needs are therefore reported next to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench_report import median

TARGET_SESSIONS = 5000
"""The plan's target: 5,000 sessions x 64 KB/s on one node."""
MIN_SESSIONS = 25
"""The search does not go below this when even its first step does not hold."""


@dataclass(frozen=True)
class CapacityPlan:
    """Bounds of one search."""

    start: int = 250
    factor: float = 1.5
    refine: int = 2
    max_sessions: int = 4000
    max_time_s: float = 900.0
    p95_limit_ms: float = 40.0


def judge(metrics: dict[str, Any], p95_limit_ms: float) -> list[str]:
    """Return why a run did not hold (empty: it held)."""
    why = []
    if metrics.get("sessions_failed"):
        why.append(f"{metrics['sessions_failed']} sessions failed to connect")
    lost = (metrics.get("data_lost") or 0) + (metrics.get("input_lost") or 0)
    if lost or metrics.get("seq_gaps") or metrics.get("unexpected_disconnects"):
        why.append(f"loss: {lost} frames lost, {metrics.get('seq_gaps')} sequence gaps, "
                   f"{metrics.get('unexpected_disconnects')} disconnects")
    p95 = metrics.get("lat_p95_ms")
    if p95 is None or p95 >= p95_limit_ms:
        why.append(f"latency p95 {p95} ms >= {p95_limit_ms:g} ms")
    if metrics.get("generator_bound"):
        reasons = "; ".join(metrics.get("generator_reasons") or [])
        why.append(f"generator-bound ({reasons})")
    if why and metrics.get("contended"):
        why.append(f"contended (other processes used {metrics.get('foreign_cpu_pct')} % of a "
                   "core)")
    return why


@dataclass
class RelaySearch:
    """Where the search of one relay stands."""

    relay: str
    plan: CapacityPlan
    held: int = 0
    failed: int = 0  # smallest S that did not hold (0: none yet)
    failed_why: list[str] = field(default_factory=list)
    refined: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)

    def next_sessions(self) -> int | None:
        """The next S to try, or None when this relay's search is over."""
        plan = self.plan
        if not self.failed:
            nxt = plan.start if not self.held else math.ceil(self.held * plan.factor)
            if self.held >= plan.max_sessions:
                return None
            return min(nxt, plan.max_sessions)
        if not self.held:  # even the first step failed: halve, a few times
            lower = self.failed // 2
            return lower if lower >= MIN_SESSIONS and self.refined < plan.refine + 2 else None
        if self.refined >= plan.refine or self.failed <= self.held * 1.1:
            return None
        return (self.held + self.failed) // 2

    def record(self, sessions: int, metrics: dict[str, Any] | None, error: str | None) -> None:
        """Note the outcome of a run at ``sessions``."""
        why = [f"run failed: {error}"] if metrics is None else judge(metrics,
                                                                     self.plan.p95_limit_ms)
        if self.failed:
            self.refined += 1
        if why:
            if not self.failed or sessions < self.failed:
                self.failed, self.failed_why = sessions, why
        else:
            self.held = max(self.held, sessions)
        self.steps.append({"sessions": sessions, "held": not why, "why": why})


def extrapolate(sessions: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-core capacity from a run that held: S / relay cores used, and cores for 5,000.

    Assumes relay CPU grows linearly with sessions (CPU per message stays flat above a few
    hundred sessions) and that latency stays under the limit until the core is full: an upper
    bound; the headroom figure keeps 20 % of each core free.
    """
    cores = (metrics.get("relay_cpu_pct") or 0.0) / 100.0
    if sessions <= 0 or cores <= 0:
        return {}
    per_core = sessions / cores
    need = TARGET_SESSIONS / per_core
    return {"relay_cpu_cores": round(cores, 3), "per_core_sessions": round(per_core),
            "per_core_mb_s": round(per_core * metrics.get("data_bytes_per_s", 65536) / 1e6, 1),
            "cores_for_target": round(need, 2),
            "cores_for_target_with_headroom": math.ceil(need / 0.8),
            "target_sessions": TARGET_SESSIONS}


def search(relays: list[str], plan: CapacityPlan,
           run_step: Callable[[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Run the search for every relay, taking turns; return the steps and the capacities.

    ``run_step(relay, sessions)`` runs one load and returns the record that counts (``ok``,
    ``metrics`` or ``error``).
    """
    started = time.monotonic()
    state = {relay: RelaySearch(relay, plan) for relay in relays}
    records: list[dict[str, Any]] = []
    stopped = ""
    while True:
        todo = [(s, n) for s in state.values() if (n := s.next_sessions()) is not None]
        if not todo:
            break
        for s, sessions in todo:
            elapsed = time.monotonic() - started
            # a step takes about as long as the last one at a similar size; stop before
            # a step would run past the budget
            last = max((r["step_s"] for r in records), default=0.0)
            if elapsed + last > plan.max_time_s:
                stopped = f"time budget of {plan.max_time_s:g} s reached after {elapsed:.0f} s"
                break
            t = time.monotonic()
            record = run_step(s.relay, sessions)
            record.update(sessions=sessions, step_s=round(time.monotonic() - t, 1))
            records.append(record)
            metrics = record.get("metrics") if record.get("ok") else None
            s.record(sessions, metrics, record.get("error"))
            record["held"] = s.steps[-1]["held"]
            record["why"] = s.steps[-1]["why"]
        if stopped:
            break
    return {"records": records, "stopped": stopped, "elapsed_s": round(time.monotonic()
                                                                       - started, 1),
            "capacity": {relay: capacity_of(s, records) for relay, s in state.items()}}


def capacity_of(s: RelaySearch, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The result of one relay's search: S held, what stopped it, the extrapolation."""
    held = [r for r in records if r["relay"] == s.relay and r.get("held")
            and r["sessions"] == s.held]
    metrics = held[-1]["metrics"] if held else {}
    out: dict[str, Any] = {
        "sessions_held": s.held, "first_not_held": s.failed or None,
        "stopped_by": s.failed_why, "steps": s.steps,
        "generator_bound_limit": any("generator-bound" in w for w in s.failed_why),
        "at_held": {k: metrics.get(k) for k in (
            "lat_p50_ms", "lat_p95_ms", "lat_p99_ms", "lat_max_ms", "cpu_us_per_msg",
            "relay_cpu_pct", "gen_cpu_fraction", "gen_sched_lag_p95_ms", "msgs_per_s")},
    }
    out |= extrapolate(s.held, metrics)
    return out


def summarize_rounds(rounds: list[dict[str, Any]], relays: list[str]) -> dict[str, Any]:
    """Medians over rounds of each relay's capacity figures, and the ratio first/second."""
    keys = ("sessions_held", "per_core_sessions", "cores_for_target")
    medians: dict[str, dict[str, float | None]] = {}
    for relay in relays:
        medians[relay] = {}
        for k in keys:
            m = median([r["capacity"][relay].get(k) for r in rounds])
            medians[relay][k] = None if m is None else round(m, 2)
    ratio: dict[str, float | None] = {}
    if len(relays) >= 2:
        first, second = medians[relays[0]], medians[relays[1]]
        for k in keys:
            a, b = first[k], second[k]
            ratio[k] = round(a / b, 3) if a and b else None
    return {"medians": medians, "ratio": {"of": "/".join(relays[:2]) if ratio else None,
                                          "values": ratio}}


def capacity_lines(result: dict[str, Any], relays: list[str]) -> list[str]:
    """The human-readable verdict: largest S held, why the next step failed, per-core figures."""
    lines = []
    for relay in relays:
        for n, rnd in enumerate(result["rounds"], 1):
            c = rnd["capacity"][relay]
            stop = "; ".join(c["stopped_by"]) or "max sessions / time reached"
            lines.append(f"{relay} round {n}: largest S that held = {c['sessions_held']} "
                         f"sessions x 64 KB/s (next step {c['first_not_held']}: {stop})")
            if c.get("per_core_sessions"):
                lines.append(
                    f"  relay used {c['relay_cpu_cores']:.2f} cores at S={c['sessions_held']} "
                    f"-> extrapolated {c['per_core_sessions']} sessions per core at p95 < 40 ms "
                    f"(measured: {c['sessions_held']} on this machine"
                    f"{', generator-bound' if c['generator_bound_limit'] else ''}); "
                    f"{c['target_sessions']} sessions need {c['cores_for_target']} cores "
                    f"({c['cores_for_target_with_headroom']} with 20 % headroom)")
    med = result["summary"]["medians"]
    for relay in relays:
        m = med[relay]
        lines.append(f"{relay} median over rounds: S held {m['sessions_held']}, per core "
                     f"{m['per_core_sessions']}, cores for {TARGET_SESSIONS}: "
                     f"{m['cores_for_target']}")
    ratio = result["summary"]["ratio"]
    if ratio["of"]:
        lines.append(f"ratio {ratio['of']}: {ratio['values']}")
    return lines
