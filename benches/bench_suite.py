"""The standard benchmark set (``make bench``): every bench once, reduced sizes, < 10 minutes.

``python -m benches standard [--only idle,active,...] [--budget 570]``

Runs, one after the other and each in its own process (``python -m benches <bench>``): idle
(10,000 connections), active with ``--find-capacity`` (each step measures one S against both
relays), handoff, reconnect-storm (2,000 peers) and webrtc-compare (20 sessions); every bench
measures the naive relay (or its own baseline) in the same run. Sizes are cut so the whole set
stays under ten minutes on a quiet 2-core machine: one round each, short windows, at most 10 s of
waiting for a quiet machine before a run and no repeats of contended runs (they are still
marked). Each bench gets a time limit; a bench that would start with less than its expected
duration left in ``--budget`` is skipped and listed. At the end the result files are collected
into ``benches/results/summary-<UTC>.md`` (:mod:`bench_summary`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_report import RESULTS_DIR
from bench_summary import write_summary

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--runs", "1", "--quiet-wait", "10", "--contended-retries", "0"]


@dataclass(frozen=True)
class Step:
    """One bench of the standard set: its command, options, result prefix and time limits."""

    name: str
    args: tuple[str, ...]
    result: str  # result files are <result>-<UTC>.json
    expected_s: float  # typical duration on a quiet machine
    limit_s: float  # killed after this


STANDARD = (
    Step("idle", ("--connections", "10000", "--hold", "10", "--settle", "2"), "idle", 75, 180),
    Step("active", ("--find-capacity", "--capacity-start", "500", "--capacity-factor", "1.6",
                    "--capacity-refine", "1", "--capacity-max-sessions", "3000",
                    "--capacity-max-time", "200", "--warmup", "3", "--duration", "6"),
         "capacity", 190, 280),
    Step("handoff", ("--connections", "500", "--accept-duration", "3"), "handoff", 70, 150),
    Step("reconnect-storm", (), "storm", 30, 120),
    Step("webrtc-compare", ("--sessions", "20", "--duration", "6", "--warmup", "2"), "webrtc",
         60, 150),
)


def run_step(step: Step, limit_s: float) -> tuple[list[Path], str]:
    """Run one bench; return its new result files and how it ended."""
    before = set(RESULTS_DIR.glob(f"{step.result}-*.json"))
    command = [sys.executable, "-m", "benches", step.name, *step.args, *COMMON]
    print(f"\n=== {step.name}: {' '.join(command[2:])} (limit {limit_s:.0f} s)", flush=True)
    started = time.monotonic()
    try:
        # SIGTERM at the limit: the benches unwind and stop their relays and generators
        done = subprocess.run(command, cwd=REPO, timeout=limit_s, check=False)
        status = f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        status = f"stopped after {limit_s:.0f} s"
    status += f", {time.monotonic() - started:.0f} s"
    new = sorted(set(RESULTS_DIR.glob(f"{step.result}-*.json")) - before)
    return new, status


def main() -> int:
    """Run the standard set within the budget and write the Markdown summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="",
                        help="comma-separated subset of: "
                             + ", ".join(s.name for s in STANDARD))
    parser.add_argument("--budget", type=float, default=570.0,
                        help="seconds for the whole set")
    args = parser.parse_args()
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {s.name for s in STANDARD}
    if unknown:
        parser.error(f"unknown benches {sorted(unknown)}")
    steps = [s for s in STANDARD if not wanted or s.name in wanted]
    deadline = time.monotonic() + args.budget
    files: list[Path] = []
    notes: list[str] = []
    failed = False
    for step in steps:
        left = deadline - time.monotonic()
        if left < step.expected_s:
            notes.append(f"{step.name}: skipped, {left:.0f} s of the budget left")
            continue
        new, status = run_step(step, min(step.limit_s, left))
        files += new
        notes.append(f"{step.name}: {status}; " + (", ".join(f"`{p.name}`" for p in new)
                                                   or "no result file"))
        failed |= not new or not status.startswith("exit 0")
    print("\n=== standard set")
    for note in notes:
        print(f"  {note}")
    if files:
        print(f"summary: {write_summary(files, notes)}")
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(main())
