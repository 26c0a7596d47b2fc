"""One load-generator process: pairs of picows clients (host + participant) on uvloop.

The parent (:mod:`loadgen`) starts this file as a child process and talks to it in JSON lines:

1. parent -> child: the configuration (see :class:`WorkerConfig`).
2. child -> parent: ``{"event": "connected", ...}`` once every session of this process has
   connected and exchanged hellos (or failed). Traffic starts per session as soon as it is ready.
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
import base64
import contextlib
import json
import logging
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic_ns
from typing import Any

import uvloop
from bench_child import emit, open_stdin, raise_nofile_limit
from bench_tokens import TokenMinter
from latency_histogram import Histogram
from loadgen_traffic import NEVER, Flow, LoopLagProbe, RateWheel
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HEADER = struct.Struct(">BBHI")
HEADER_TS = struct.Struct(">BBHIQ")
KIND_DATA = 1
KIND_HEARTBEAT = 2
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


class Peer(WSListener):
    """One WebSocket client (host or participant) of a session."""

    def __init__(self, gen: Generator, role: str, session_id: str) -> None:
        self.gen = gen
        self.role = role
        self.session_id = session_id
        self.transport: WSTransport | None = None
        self.hello_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seq = 0
        self.hb_seq = 0
        self.expect_seq = -1
        self.hb_sent_ns = 0
        self.closed = False
        self.close_code: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Send the client hello."""
        self.transport = transport
        hello = {"type": "client_hello", "session_id": self.session_id, "role": self.role,
                 "protocol_version": 1,
                 "client_nonce": base64.b64encode(os.urandom(16)).decode(),
                 "compression": ["none"], "peer_id": os.urandom(8).hex()}
        transport.send(WSMsgType.TEXT, json.dumps(hello).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Account binary frames, complete the hello on ``server_hello``, answer a close."""
        msg_type = frame.msg_type
        if msg_type is WSMsgType.BINARY:
            self._on_binary(frame)
        elif msg_type is WSMsgType.TEXT:
            try:
                event = json.loads(frame.get_payload_as_bytes())
            except ValueError:
                self.gen.count_error("text frame is not JSON")
                return
            if event.get("type") == "server_hello" and not self.hello_done.done():
                self.hello_done.set_result(None)
        elif msg_type is WSMsgType.CLOSE:
            raw = frame.get_payload_as_bytes()
            self.close_code = int.from_bytes(raw[:2], "big") if len(raw) >= 2 else None
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def _on_binary(self, frame: WSFrame) -> None:
        now = monotonic_ns()
        gen = self.gen
        size = frame.payload_size
        if size < 8:
            gen.bad_frames += 1
            return
        payload = frame.get_payload_as_memoryview()
        if size >= 16:
            version, kind, length, seq, ts = HEADER_TS.unpack_from(payload)
        else:
            version, kind, length, seq = HEADER.unpack_from(payload)
            ts = 0
        if version != 1 or length != size - 8:
            gen.bad_frames += 1
        if kind == KIND_DATA:
            flow = gen.data if self.role == "participant" else gen.input
            flow.received_total += 1
            if self.expect_seq >= 0 and seq != self.expect_seq:
                flow.seq_gaps += 1
            self.expect_seq = (seq + 1) & 0xFFFFFFFF
            if gen.t0 <= now < gen.t1:
                flow.received_in_window += 1
            if gen.t0 <= ts < gen.t1:
                flow.delivered_in_window += 1
                flow.latency_us.record((now - ts) // 1000)
        elif kind == KIND_HEARTBEAT:
            hb = gen.heartbeat
            hb.received_total += 1
            sent = self.hb_sent_ns
            if sent:
                self.hb_sent_ns = 0
                if gen.t0 <= sent < gen.t1:
                    hb.delivered_in_window += 1
                    hb.latency_us.record((now - sent) // 1000)
            if gen.t0 <= now < gen.t1:
                hb.received_in_window += 1
        else:
            gen.other_frames += 1
        if not gen.sending and not gen.in_flight():
            gen.drained.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Record an unexpected disconnect (one the generator did not ask for)."""
        self.closed = True
        if not self.hello_done.done():
            self.hello_done.set_exception(ConnectionError(
                f"disconnected before server_hello (close code {self.close_code})"))
        if not self.gen.closing:
            self.gen.unexpected_disconnects += 1
            self.gen.count_error(f"{self.role} disconnected, close code {self.close_code}")

    def send_frame(self, kind: int, template: bytearray) -> int:
        """Send ``template`` with a fresh header and send timestamp; return the timestamp.

        Data frames are numbered in their own sequence (the receiver checks it for gaps);
        heartbeats, which the relay answers rather than forwards, in another.
        """
        now = monotonic_ns()
        if kind == KIND_DATA:
            seq = self.seq
            self.seq = (seq + 1) & 0xFFFFFFFF
        else:
            seq = self.hb_seq
            self.hb_seq = (seq + 1) & 0xFFFFFFFF
        HEADER_TS.pack_into(template, 0, 1, kind, len(template) - 8, seq, now)
        assert self.transport is not None
        self.transport.send(WSMsgType.BINARY, template)
        return now


class Generator:
    """Runs the sessions of one process through connect, traffic, window and drain."""

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
        self.connections_opened = 0
        self.bad_frames = 0
        self.other_frames = 0
        self.unexpected_disconnects = 0
        self.errors: dict[str, int] = {}
        self.peers: list[Peer] = []
        self.connect_us = Histogram()
        self.sessions_ok = 0
        self.sessions_failed = 0
        self.first_connect_ns = 0
        self.last_ready_ns = 0
        self.cpu_marks: dict[str, float] = {}
        self.data_template = bytearray(os.urandom(8 + max(8, config.data_bytes)))
        self.input_template = bytearray(os.urandom(8 + max(8, config.input_bytes)))
        self.hb_template = bytearray(16)
        tick_ns = int(config.tick_s * 1e9)
        self.wheels: list[RateWheel] = []
        self.data_wheel = self._wheel(config.data_rate, tick_ns, self._send_data)
        self.input_wheel = self._wheel(config.input_rate, tick_ns, self._send_input)
        self.hb_wheel = self._wheel(1.0 / config.heartbeat_s if config.heartbeat_s > 0 else 0,
                                    tick_ns, self._send_heartbeat)

    def _wheel(self, rate: float, tick_ns: int,
               action: Callable[[Any], None]) -> RateWheel | None:
        if rate <= 0:
            return None
        wheel = RateWheel(int(1e9 / rate), tick_ns, action)
        self.wheels.append(wheel)
        return wheel

    def count_error(self, message: str) -> None:
        """Count an error by its message (a bounded number of distinct messages)."""
        if message in self.errors or len(self.errors) < MAX_DISTINCT_ERRORS:
            self.errors[message] = self.errors.get(message, 0) + 1

    def _in_window(self, t: int) -> bool:
        return self.t0 <= t < self.t1

    def _send_data(self, peer: Peer) -> None:
        if (not peer.closed and self.sending
                and self._in_window(peer.send_frame(KIND_DATA, self.data_template))):
            self.data.sent_in_window += 1

    def _send_input(self, peer: Peer) -> None:
        if (not peer.closed and self.sending
                and self._in_window(peer.send_frame(KIND_DATA, self.input_template))):
            self.input.sent_in_window += 1

    def _send_heartbeat(self, peer: Peer) -> None:
        if not peer.closed and self.sending:
            peer.hb_sent_ns = peer.send_frame(KIND_HEARTBEAT, self.hb_template)
            if self._in_window(peer.hb_sent_ns):
                self.heartbeat.sent_in_window += 1

    def _local_addr(self) -> tuple[str, int] | None:
        """The next source address (round robin over ``source_addrs``), or None."""
        addrs = self.config.source_addrs
        if not addrs:
            return None
        self.connections_opened += 1
        return (addrs[self.connections_opened % len(addrs)], 0)

    async def _open_peer(self, session_id: str, token: str, role: str) -> Peer:
        query = f"?session={session_id}" + (f"&token={token}" if token else "")
        started = monotonic_ns()
        _, peer = await ws_connect(
            lambda: Peer(self, role, session_id), self.config.url + query,
            websocket_handshake_timeout=self.config.connect_timeout_s,
            enable_auto_ping=False, max_frame_size=1 << 17, local_addr=self._local_addr())
        assert isinstance(peer, Peer)
        self.peers.append(peer)
        await asyncio.wait_for(peer.hello_done, self.config.connect_timeout_s)
        self.connect_us.record((monotonic_ns() - started) // 1000)
        return peer

    async def _open_session(self, global_index: int, minter: TokenMinter | None,
                            gate: asyncio.Semaphore) -> None:
        cfg = self.config
        if cfg.ramp_sessions_per_s > 0:
            due = cfg.start_ns + int(global_index / cfg.ramp_sessions_per_s * 1e9)
            await asyncio.sleep(max(0.0, (due - monotonic_ns()) / 1e9))
        session_id = f"{cfg.session_prefix}-{global_index}"
        token = minter.mint(session_id) if minter else ""
        async with gate:
            if not self.first_connect_ns:
                self.first_connect_ns = monotonic_ns()
            try:
                host = await self._open_peer(session_id, token, "host")
                participant = await self._open_peer(session_id, token, "participant")
            except Exception as e:
                self.sessions_failed += 1
                self.count_error(f"connect: {type(e).__name__}: {str(e)[:160]}")
                return
        self.sessions_ok += 1
        self.last_ready_ns = monotonic_ns()
        if self.data_wheel:
            self.data_wheel.add(host)
        if self.input_wheel:
            self.input_wheel.add(participant)
        if self.hb_wheel:
            self.hb_wheel.add(host)
            self.hb_wheel.add(participant)

    async def connect_all(self) -> None:
        """Open this process's share of the sessions at the configured ramp rate."""
        cfg = self.config
        minter = TokenMinter(cfg.token_keys, cfg.kid) if cfg.token_keys else None
        gate = asyncio.Semaphore(cfg.connect_concurrency)
        tasks = [asyncio.ensure_future(self._open_session(i, minter, gate))
                 for i in range(cfg.proc_index, cfg.total_sessions, cfg.procs)]
        cpu_before = _cpu_seconds()
        _, pending = await asyncio.wait(tasks, timeout=cfg.connect_phase_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            self.count_error(f"connect phase timed out with {len(pending)} sessions pending")
            self.sessions_failed += len(pending)
            await asyncio.wait(pending, timeout=5)
        self.cpu_marks["connect"] = _cpu_seconds() - cpu_before

    async def tick(self) -> None:
        """Drive the send wheels every ``tick_s`` until the window ends."""
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
        loop.call_later(max(0.0, (t0 - now) / 1e9), self._mark_cpu, "t0")
        loop.call_later(max(0.0, (t1 - now) / 1e9), self._mark_cpu, "t1")

    def _mark_cpu(self, name: str) -> None:
        self.cpu_marks[name] = _cpu_seconds()
        self.cpu_marks[name + "_ns"] = monotonic_ns()

    def in_flight(self) -> bool:
        """Tell whether frames sent in the window are still unaccounted for."""
        return (self.data.delivered_in_window < self.data.sent_in_window
                or self.input.delivered_in_window < self.input.sent_in_window
                or self.heartbeat.delivered_in_window < self.heartbeat.sent_in_window)

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
        """Return the ``result`` event sent to the parent."""
        marks = self.cpu_marks
        window_s = (marks.get("t1_ns", 0) - marks.get("t0_ns", 0)) / 1e9
        cpu_s = marks.get("t1", 0.0) - marks.get("t0", 0.0)
        return {"event": "result", "proc": self.config.proc_index, "pid": os.getpid(),
                "cpu_s": cpu_s, "window_s": window_s,
                "cpu_fraction": cpu_s / window_s if window_s > 0 else None,
                "lag_us": self.lag.lag_us.to_json(),
                "schedule_lag_us": self._schedule_lag().to_json(), "data": self.data.to_json(),
                "input": self.input.to_json(), "heartbeat": self.heartbeat.to_json(),
                "bad_frames": self.bad_frames, "other_frames": self.other_frames,
                "unexpected_disconnects": self.unexpected_disconnects,
                "drain_waited_s": drain_waited_s, "errors": dict(self.errors)}

    def _schedule_lag(self) -> Histogram:
        merged = Histogram()
        for wheel in self.wheels:
            merged.merge(wheel.late_us)
        return merged

    async def close_all(self, limit_s: float = 10.0) -> None:
        """Close every connection with 1000 and wait (bounded) until they are gone."""
        self.closing = True
        self.lag.running = False
        waits = []
        for peer in self.peers:
            if peer.transport is not None and not peer.closed:
                with contextlib.suppress(Exception):
                    peer.transport.send_close(WSCloseCode.OK)
                    peer.transport.disconnect()
                waits.append(peer.transport.wait_disconnected())
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=limit_s)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


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


async def run_worker() -> None:
    """Run one generator process, speaking the JSON-lines protocol on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = await open_stdin()
    config = WorkerConfig(**json.loads(await reader.readline()))
    loop.call_later(config.max_wall_s, os._exit, 3)
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    command_task = asyncio.ensure_future(_read_commands(reader, commands))
    gen = Generator(config)
    lag_task = asyncio.ensure_future(gen.lag.run())
    tick_task = asyncio.ensure_future(gen.tick())
    await gen.connect_all()
    emit(gen.connected_report())
    command = await commands.get()
    if command.get("cmd") == "window":
        gen.set_window(int(command["t0_ns"]), int(command["t1_ns"]))
        await tick_task
        waited = await gen.drain()
        emit(gen.result(waited))
    gen.sending = False
    await gen.close_all()
    for task in (lag_task, tick_task, command_task):
        task.cancel()


def main() -> None:
    """Entry point of the child process."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    raise_nofile_limit()
    uvloop.run(run_worker())


if __name__ == "__main__":
    main()
