"""What every generator process of :mod:`loadgen`'s protocol shares, whatever its clients are.

:mod:`loadgen_worker` (picows clients speaking the relay protocol) and :mod:`channel_worker`
(message channels: WebRTC, the SDK, raw frames) differ only in how a session is opened and how a
message is sent and received. The rest is here: the configuration (:class:`WorkerConfig`), the
window bookkeeping, flows, timing wheels, lag probe and reports (:class:`GeneratorCore`), and the
JSON-lines conversation with the parent (:func:`run_generator`):

1. parent -> child: the configuration, one JSON line.
2. child -> parent: ``{"event": "connected", ...}`` once every session of this process has
   connected (or failed). Traffic starts per session as soon as it is ready.
3. parent -> child: ``{"cmd": "window", "t0_ns": ..., "t1_ns": ...}``, the measured window in
   ``time.monotonic_ns()`` (CLOCK_MONOTONIC is shared by every process of the machine).
4. At ``t1`` the child stops sending, waits up to ``drain_s`` for frames still in flight, sends
   ``{"event": "result", ...}`` and closes its connections. ``{"cmd": "abort"}`` or EOF on stdin
   ends it early; ``max_wall_s`` bounds its life in any case.

A frame counts as *sent in the window* when its send time lies in [t0, t1); it counts as
*delivered* when its embedded send timestamp lies in that window, whenever it arrives before the
drain ends; latency samples are those delivered frames. *Received in window* counts frames by
arrival time (the relay's work during the window, the denominator of CPU per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic_ns
from typing import Any

from bench_child import emit, open_stdin
from latency_histogram import Histogram
from loadgen_traffic import NEVER, Flow, LoopLagProbe, RateWheel

MAX_DISTINCT_ERRORS = 20


@dataclass
class WorkerConfig:
    """Everything one generator process needs; sent by the parent as one JSON line."""

    url: str
    proc_index: int
    procs: int
    total_sessions: int
    session_prefix: str
    start_ns: int
    ramp_sessions_per_s: float = 500.0
    connect_concurrency: int = 100
    connect_timeout_s: float = 10.0
    connect_phase_timeout_s: float = 120.0
    data_rate: float = 16.0
    data_bytes: int = 4096
    input_rate: float = 2.0
    input_bytes: int = 64
    heartbeat_s: float = 15.0
    drain_s: float = 3.0
    token_keys: str = ""
    kid: str = ""
    max_wall_s: float = 600.0
    lag_probe_s: float = 0.01
    tick_s: float = 0.001
    source_addrs: list[str] = field(default_factory=list)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    t = os.times()
    return t.user + t.system


class GeneratorCore:
    """One generator process's sessions through connect, traffic, window and drain.

    Subclasses open the sessions (:meth:`connect_all`, counting them in ``sessions_ok`` /
    ``sessions_failed`` and ``connect_us``), add their peers to the wheels made by
    :meth:`add_wheel`, account received frames in the flows (``data``: host to participant,
    ``input``: back, ``heartbeat``: answered heartbeats) and close everything in
    :meth:`close_all`.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.t0 = NEVER
        self.t1 = NEVER
        self.closing = False
        self.sending = True
        self.drained = asyncio.Event()
        self.data = Flow()
        self.input = Flow()
        self.heartbeat = Flow()
        self.lag = LoopLagProbe(config.lag_probe_s)
        self.wheels: list[RateWheel] = []
        self.bad_frames = 0
        self.other_frames = 0
        self.unexpected_disconnects = 0
        self.errors: dict[str, int] = {}
        self.connect_us = Histogram()
        self.sessions_ok = 0
        self.sessions_failed = 0
        self.first_connect_ns = 0
        self.last_ready_ns = 0
        self.cpu_marks: dict[str, float] = {}

    def add_wheel(self, rate: float, action: Callable[[Any], None]) -> RateWheel | None:
        """A timing wheel calling ``action(peer)`` ``rate`` times a second per added peer
        (None for a rate of 0); :meth:`tick` drives it."""
        if rate <= 0:
            return None
        wheel = RateWheel(int(1e9 / rate), int(self.config.tick_s * 1e9), action)
        self.wheels.append(wheel)
        return wheel

    def count_error(self, message: str) -> None:
        """Count an error by its message (a bounded number of distinct messages)."""
        if message in self.errors or len(self.errors) < MAX_DISTINCT_ERRORS:
            self.errors[message] = self.errors.get(message, 0) + 1

    def in_window(self, t: int) -> bool:
        """Tell whether ``t`` (``monotonic_ns``) lies in the measured window."""
        return self.t0 <= t < self.t1

    async def connect_all(self) -> None:
        """Open this process's share of the sessions (the subclass's job)."""
        raise NotImplementedError

    async def gather_sessions(self, tasks: list[asyncio.Future[None]]) -> None:
        """Wait for the session-opening ``tasks`` (bounded by the connect phase); count the
        ones still pending as failed; note the CPU the connect phase took."""
        cpu_before = cpu_seconds()
        _, pending = await asyncio.wait(tasks, timeout=self.config.connect_phase_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            self.count_error(f"connect phase timed out with {len(pending)} sessions pending")
            self.sessions_failed += len(pending)
            await asyncio.wait(pending, timeout=5)
        self.cpu_marks["connect"] = cpu_seconds() - cpu_before

    async def tick(self) -> None:
        """Drive the wheels every ``tick_s`` until the window ends (recording their lateness
        inside it)."""
        while self.sending:
            now = monotonic_ns()
            if now >= self.t1:
                self.sending = False
                break
            recording = now >= self.t0
            for wheel in self.wheels:
                wheel.run_due(now, recording)
            await asyncio.sleep(self.config.tick_s)

    def set_window(self, t0: int, t1: int) -> None:
        """Fix the measured window and schedule the CPU samples at its edges."""
        self.t0, self.t1 = t0, t1
        self.lag.t0, self.lag.t1 = t0, t1
        loop = asyncio.get_running_loop()
        now = monotonic_ns()
        for name, at in (("t0", t0), ("t1", t1)):
            loop.call_later(max(0.0, (at - now) / 1e9), self._mark_cpu, name)

    def _mark_cpu(self, name: str) -> None:
        if name not in self.cpu_marks:
            self.cpu_marks[name] = cpu_seconds()
            self.cpu_marks[name + "_ns"] = monotonic_ns()

    def in_flight(self) -> bool:
        """Tell whether frames sent in the window are still unaccounted for."""
        return any(f.delivered_in_window < f.sent_in_window
                   for f in (self.data, self.input, self.heartbeat))

    def note_received(self) -> None:
        """After accounting a frame: wake :meth:`drain` once nothing is in flight."""
        if not self.sending and not self.in_flight():
            self.drained.set()

    async def drain(self) -> float:
        """Wait (bounded by ``drain_s``) for in-flight frames; return the seconds waited."""
        start = monotonic_ns()
        if self.in_flight():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), self.config.drain_s)
        return (monotonic_ns() - start) / 1e9

    def connected_report(self) -> dict[str, Any]:
        """Return the ``connected`` event sent to the parent."""
        return {"event": "connected", "proc": self.config.proc_index,
                "sessions_ok": self.sessions_ok, "sessions_failed": self.sessions_failed,
                "first_connect_ns": self.first_connect_ns, "last_ready_ns": self.last_ready_ns,
                "cpu_connect_s": self.cpu_marks.get("connect", 0.0),
                "connect_us": self.connect_us.to_json(), "errors": dict(self.errors)}

    def result(self, drain_waited_s: float) -> dict[str, Any]:
        """Return the ``result`` event sent to the parent.

        The window's end is marked now if its timer has not fired yet (the tick loop can see
        ``t1`` pass a moment before the timer, and an empty drain returns at once).
        """
        self._mark_cpu("t1")
        marks = self.cpu_marks
        window_s = (marks["t1_ns"] - marks.get("t0_ns", marks["t1_ns"])) / 1e9
        cpu_s = marks["t1"] - marks.get("t0", marks["t1"])
        schedule = Histogram()
        for wheel in self.wheels:
            schedule.merge(wheel.late_us)
        return {"event": "result", "proc": self.config.proc_index, "pid": os.getpid(),
                "cpu_s": cpu_s, "window_s": window_s,
                "cpu_fraction": cpu_s / window_s if window_s > 0 else None,
                "lag_us": self.lag.lag_us.to_json(), "schedule_lag_us": schedule.to_json(),
                "data": self.data.to_json(), "input": self.input.to_json(),
                "heartbeat": self.heartbeat.to_json(), "bad_frames": self.bad_frames,
                "other_frames": self.other_frames,
                "unexpected_disconnects": self.unexpected_disconnects,
                "drain_waited_s": drain_waited_s, "errors": dict(self.errors)}

    async def close_all(self) -> None:
        """Close every connection (the subclass's job); call this first."""
        self.closing = True
        self.sending = False
        self.lag.running = False


async def _read_commands(reader: asyncio.StreamReader,
                         commands: asyncio.Queue[dict[str, Any]]) -> None:
    """Queue the parent's commands; exit at once on EOF or ``abort`` (the parent is gone)."""
    while True:
        line = await reader.readline()
        if not line:
            os._exit(4)
        command = json.loads(line)
        if command.get("cmd") == "abort":
            os._exit(5)
        await commands.put(command)


async def run_generator(make: Callable[[dict[str, Any]], GeneratorCore]) -> None:
    """Run one generator process: read its configuration, build it with ``make``, speak the
    protocol of the module docstring on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = await open_stdin()
    raw = json.loads(await reader.readline())
    gen = make(raw)
    loop.call_later(gen.config.max_wall_s, os._exit, 3)
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    command_task = asyncio.ensure_future(_read_commands(reader, commands))
    lag_task = asyncio.ensure_future(gen.lag.run())
    tick_task = asyncio.ensure_future(gen.tick())
    await gen.connect_all()
    emit(gen.connected_report())
    command = await commands.get()
    if command.get("cmd") == "window":
        gen.set_window(int(command["t0_ns"]), int(command["t1_ns"]))
        await tick_task
        emit(gen.result(await gen.drain()))
    await gen.close_all()
    for task in (lag_task, tick_task, command_task):
        task.cancel()
