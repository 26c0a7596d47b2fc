"""What every relay bench does around its load: keys, pinning, alternating rounds, output.

A bench calls :func:`prepare`, then :func:`alternate` with a function that runs one load against
a started relay (:func:`with_relay` starts it, checks health and always stops it), then
:func:`finish` to write ``benches/results/<bench>-<UTC>.json`` and print the summary table.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_host import (
    ForeignCpu,
    code_revision,
    describe_machine,
    free_port,
    parse_cpus,
    pin_self,
    wait_for_quiet,
)
from bench_report import Metric, run_lines, summarize, summary_table, write_result
from bench_tokens import generate_keys
from relay_process import RELAY_NAMES, RelayProcess, relay_spec

CONTENDED_CORES = 0.10
"""Foreign CPU (other processes on the machine) above this share of a core marks a run."""


class RelaySampler:
    """Samples the relay (CPU, RSS) and the machine's foreign CPU at the edges of a load.

    Passed to :func:`loadgen.run_load` as its observer; :meth:`window` turns the marks into
    relay CPU seconds, wall time and contention of the measured window. Without a relay
    (peers talking directly) its CPU and RSS count as 0 and only the machine is sampled.
    """

    def __init__(self, relay: RelayProcess | None) -> None:
        self.relay = relay
        self.marks: dict[str, float] = {"cpu_before": self._cpu()}
        self._foreign: ForeignCpu | None = None

    def _cpu(self) -> float:
        return self.relay.cpu_seconds() if self.relay else 0.0

    def _rss(self) -> int:
        return self.relay.rss_bytes() if self.relay else 0

    def at_connected(self) -> None:
        """Relay CPU and RSS right after the last session's hello."""
        self.marks["cpu_connected"] = self._cpu()
        self.marks["rss_connected"] = self._rss()

    def at_window_start(self) -> None:
        """Relay CPU and the foreign-CPU baseline at the start of the window."""
        self.marks["t0"] = time.monotonic()
        self.marks["cpu0"] = self._cpu()
        self._foreign = ForeignCpu()

    def at_window_end(self) -> None:
        """Relay CPU, RSS and foreign CPU at the end of the window."""
        self.marks["cpu1"] = self._cpu()
        self.marks["t1"] = time.monotonic()
        self.marks["rss_end"] = self._rss()
        self.marks["foreign_s"] = self._foreign.seconds() if self._foreign else 0.0

    def window(self) -> dict[str, Any]:
        """Return relay CPU seconds, wall seconds, foreign CPU % and ``contended``."""
        wall = self.marks["t1"] - self.marks["t0"]
        foreign = self.marks["foreign_s"] / wall if wall > 0 else 0.0
        return {"relay_cpu_s": round(self.marks["cpu1"] - self.marks["cpu0"], 4),
                "wall_s": wall, "foreign_cpu_pct": round(100 * foreign, 1),
                "contended": foreign > CONTENDED_CORES}


@dataclass
class BenchContext:
    """Settings shared by every run of one bench invocation."""

    relays: list[str]
    runs: int
    relay_cpus: list[int]
    gen_cpus: list[int]
    work_dir: Path
    relay_env: dict[str, str]
    contended_retries: int = 1
    quiet_wait_s: float = 15.0
    relay_lifetime_s: float = 1800.0
    kid: str = ""
    key_error: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def key_dir(self) -> str:
        """Directory holding the signing key pair (created by :func:`prepare`)."""
        return str(self.work_dir / "keys")


def add_common_arguments(parser: argparse.ArgumentParser, *, with_gen_cpus: bool) -> None:
    """Add ``--runs``, ``--relays``, ``--quick``, CPU pinning and relay environment options.

    ``with_gen_cpus`` False leaves ``--gen-cpus`` to the caller (``loadgen`` has it already).
    """
    parser.add_argument("--runs", type=int, default=None, help="rounds (quick: 1)")
    parser.add_argument("--relays", default="rescue,naive",
                        help="comma-separated, in alternation order; the ratio is first/second")
    parser.add_argument("--quick", action="store_true", help="short smoke-check settings")
    parser.add_argument("--relay-cpus", default="0", help="CPUs for the relay ('' = any)")
    if with_gen_cpus:
        parser.add_argument("--gen-cpus", default="1",
                            help="CPUs for generators and this process ('' = any)")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the rescue relay (repeatable)")
    parser.add_argument("--contended-retries", type=int, default=None,
                        help="repeat a run whose window saw other processes use more than "
                             f"{100 * CONTENDED_CORES:g} %% of a core, up to this many times "
                             "(default 1; quick: 0)")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each run, wait up to this many seconds for the machine to "
                             "be quiet (default 15; quick: 5; 0: do not wait)")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _known_relay(name: str) -> bool:
    try:
        relay_spec(name)
    except KeyError:
        return False
    return True


def _default(value: Any, quick: bool, normal: Any, quick_value: Any) -> Any:
    return value if value is not None else (quick_value if quick else normal)


def prepare(parser: argparse.ArgumentParser, args: argparse.Namespace,
            default_runs: int) -> BenchContext:
    """Validate relays, describe the machine, pin this process, generate signing keys."""
    relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    unknown = [r for r in relays if not _known_relay(r)]
    if unknown or not relays:
        parser.error(f"unknown relays {unknown}; known: {RELAY_NAMES}")
    env = {"BEACH_RESCUE_DRAIN_TIMEOUT_S": "5"}
    for pair in args.relay_env:
        name, _, value = pair.partition("=")
        env[name] = value
    runs = _default(args.runs, args.quick, default_runs, 1)
    ctx = BenchContext(relays=relays, runs=runs, relay_cpus=parse_cpus(args.relay_cpus),
                       gen_cpus=parse_cpus(args.gen_cpus),
                       work_dir=Path(tempfile.mkdtemp(prefix="relay-bench-")), relay_env=env,
                       machine=describe_machine(),
                       contended_retries=_default(args.contended_retries, args.quick, 1, 0),
                       quiet_wait_s=_default(args.quiet_wait, args.quick, 15.0, 5.0))
    pin_self(ctx.gen_cpus)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every `finally` stops its relay
    # and generator processes instead of orphaning them.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if any(relay_spec(r).needs_token for r in relays):
        try:
            ctx.kid = generate_keys(Path(ctx.key_dir))
        except Exception as e:
            ctx.key_error = str(e)
            print(f"warning: {e}", file=sys.stderr)
    return ctx


def note_failure(record: dict[str, Any], error: Exception) -> None:
    """Record a failed run: ``error`` (type and message) and a short ``traceback``."""
    record["error"] = f"{type(error).__name__}: {error}"
    record["traceback"] = traceback.format_exc(limit=6)


def with_relay(ctx: BenchContext, relay_name: str, label: str,
               body: Callable[[RelayProcess, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Start ``relay_name``, wait for /healthz, call ``body(relay, record)``, stop the relay.

    ``body`` returns the run's flat metrics; the record gets ``ok``, ``metrics`` and, on any
    failure, ``error``, a short traceback and the tail of the relay's log.
    """
    spec = relay_spec(relay_name)
    port = free_port()
    record: dict[str, Any] = {"relay": relay_name, "ok": False, "port": port}
    if spec.needs_token and not ctx.kid:
        record["error"] = f"no signing key: {ctx.key_error}"
        return record
    relay = RelayProcess(spec, port, cpus=ctx.relay_cpus, key_dir=ctx.key_dir,
                         log_path=ctx.work_dir / f"{label}-{relay_name}.log",
                         env=ctx.relay_env if relay_name.startswith("rescue") else None,
                         lifetime_s=ctx.relay_lifetime_s)
    try:
        record["healthy_after_s"] = round(relay.wait_healthy(), 3)
        record["metrics"] = body(relay, record)
        record["processes"] = relay.processes()
        record["ok"] = True
    except Exception as e:
        note_failure(record, e)
        record["relay_log_tail"] = relay.log_tail()
    finally:
        record["exit_status"] = relay.stop()
    return record


def alternate(ctx: BenchContext, run: Callable[[str, str], dict[str, Any]],
              line_keys: Sequence[str], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run ``run(name, label)`` for each round and name in turn (a, b, a, b, ...).

    ``names`` are the set-ups to alternate (default: the bench's relays); each record is
    tagged with its name as ``relay``. Before each run, wait (bounded) for the machine to be
    quiet; a run whose window was contended by other processes is kept but marked
    ``discarded`` and repeated, up to ``ctx.contended_retries`` times (the last attempt counts
    whatever it saw).
    """
    records = []
    for round_no in range(1, ctx.runs + 1):
        for relay_name in names or ctx.relays:
            records += run_counted(ctx, run, relay_name, round_no, line_keys)
    return records


def run_counted(ctx: BenchContext, run: Callable[[str, str], dict[str, Any]], name: str,
                round_no: int, line_keys: Sequence[str], *,
                tag: str = "") -> list[dict[str, Any]]:
    """Run ``run(name, label)`` until one attempt counts; return every attempt's record.

    Before each attempt, wait (bounded) for a quiet machine; an attempt other processes
    contended is marked ``discarded`` and repeated, up to ``ctx.contended_retries`` times.
    The last record returned is the one that counts. ``tag`` is added to the labels.
    """
    records = []
    for attempt in range(1, ctx.contended_retries + 2):
        print(f"round {round_no}/{ctx.runs}: {name}{' ' + tag if tag else ''} "
              f"(attempt {attempt}) ...", file=sys.stderr, flush=True)
        quiet = wait_for_quiet(max_wait_s=ctx.quiet_wait_s) if ctx.quiet_wait_s else None
        code = code_revision()  # other work may commit to the tree while a bench runs
        record = run(name, f"r{round_no}{tag}a{attempt}")
        record.update(relay=name, round=round_no, attempt=attempt, foreign_cores_before=quiet,
                      code=code)
        records.append(record)
        contended = record.get("ok") and record["metrics"].get("contended")
        if contended and attempt <= ctx.contended_retries:
            record["discarded"] = "contended"
        print(run_lines([record], line_keys), file=sys.stderr, flush=True)
        if not record.get("discarded"):
            break
    return records


def result_header(bench: str, ctx: BenchContext, config: dict[str, Any]) -> dict[str, Any]:
    """Return what every result file starts with: the bench, when it started and took, the
    machine (CPU, versions, git revision) and the configuration, with the context's relays,
    rounds, pinning and relay environment added to ``config``."""
    return {
        "bench": bench,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.started)),
        "elapsed_s": round(time.time() - ctx.started, 1),
        "machine": ctx.machine,
        "config": config | {"relays": ctx.relays, "runs": ctx.runs,
                            "relay_cpus": ctx.relay_cpus, "gen_cpus": ctx.gen_cpus,
                            "relay_env": ctx.relay_env, "key_error": ctx.key_error},
    }


def finish(bench: str, ctx: BenchContext, records: list[dict[str, Any]], *,
           metrics: Sequence[Metric], line_keys: Sequence[str], headline: str,
           config: dict[str, Any], columns: Sequence[str] | None = None) -> int:
    """Write the JSON result, print runs and summary; return the exit status (1: all failed).

    ``columns`` are the set-ups compared side by side (default: the relays); the ratio is
    first/second.
    """
    columns = columns or ctx.relays
    summary = summarize(records, columns, metrics)
    failed = [r for r in records if not r.get("ok")]
    counted = [r for r in records if r.get("ok") and not r.get("discarded")]
    generator_bound = any(r["metrics"].get("generator_bound") for r in counted)
    contended = any(r["metrics"].get("contended") for r in counted)
    payload = result_header(bench, ctx, config) | {
        "summary": summary,
        "generator_bound": generator_bound,
        "contended": contended,
        "runs": records,
    }
    path = write_result(bench, payload)
    print()
    print(headline)
    print(run_lines(records, line_keys))
    print()
    print(summary_table(summary, columns, metrics))
    if generator_bound:
        print("\nWARNING: generator_bound: the load generator, not the relay, may have limited "
              "a run (see runs[].load.generator.reasons)")
    if contended:
        print(f"\nWARNING: contended: other processes used more than {CONTENDED_CORES:.0%} of a "
              "core during a counted run (runs[].metrics.foreign_cpu_pct); its numbers are "
              "unreliable")
    print(f"\nresults: {path}")
    discarded = len(records) - len(counted) - len(failed)
    if discarded:
        print(f"{discarded} contended run(s) were repeated and left out of the medians")
    if failed:
        print(f"{len(failed)} run(s) failed; relay logs kept in {ctx.work_dir}")
    else:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    return 1 if len(failed) == len(records) else 0
