"""A generator process whose sessions are message channels: WebRTC, the SDK's E2E channel, raw.

It speaks :mod:`loadgen`'s protocol (configuration line, ``connected`` event, ``window``
command, ``result`` event; see :mod:`loadgen_worker`), so :func:`loadgen.run_load` drives it and
:func:`loadgen.merge_results` merges it unchanged. Its extra option ``transport`` picks how each
session's host and participant (both in this process) are connected:

* ``webrtc``: an aiortc data channel between them (:func:`rescue.client.webrtc.open_webrtc`,
  in-process signalling, loopback ICE, DTLS + SCTP; no relay involved);
* ``ws-e2e``: the client SDK's channel through the relay (:func:`rescue.client.connect`: X25519
  handshake, AEAD-sealed frames, acks and a replay buffer, heartbeats);
* ``ws-raw``: the relay's wire protocol without the SDK: hello, then each message as one data
  frame (8-byte header + payload), over the same aiohttp client the SDK uses.

The traffic is :mod:`loadgen`'s: every host sends a ``data_bytes`` message ``data_rate`` times a
second, every participant an ``input_bytes`` message ``input_rate`` times a second back, send
times spread by timing wheels. Each message starts with its send time (``monotonic_ns``, taken
right before the channel's ``send``) and a per-direction sequence number; the receiver records
latency, sequence gaps and the window counts in :class:`loadgen_traffic.Flow` exactly as
:mod:`loadgen_worker` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from time import monotonic_ns
from typing import Any, Protocol

import aiohttp
import uvloop
from bench_child import emit, open_stdin, raise_nofile_limit
from bench_tokens import TokenMinter
from latency_histogram import Histogram
from loadgen_traffic import NEVER, Flow, LoopLagProbe, RateWheel
from ws_client import client_hello

from rescue.client.channel import ChannelOptions, connect
from rescue.client.webrtc import open_webrtc, signalling_pair
from rescue.frames import Kind, decode_frame, encode_frame

STAMP = struct.Struct(">QI")  # send time (monotonic_ns), sequence number
TRANSPORTS = ("webrtc", "ws-e2e", "ws-raw")
MAX_DISTINCT_ERRORS = 20


class Channel(Protocol):
    """What every transport gives a peer (the shape of the SDK's MessageChannel)."""

    async def send(self, data: bytes) -> None:
        """Send one message."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The other side's messages."""

    async def close(self) -> None:
        """Close the channel."""


@dataclass
class ChannelConfig:
    """The part of :class:`loadgen_worker.WorkerConfig` this generator uses, and its transport."""

    url: str
    proc_index: int
    procs: int
    total_sessions: int
    session_prefix: str
    start_ns: int
    transport: str = "webrtc"
    ramp_sessions_per_s: float = 0.0
    connect_concurrency: int = 20
    connect_timeout_s: float = 20.0
    connect_phase_timeout_s: float = 120.0
    data_rate: float = 16.0
    data_bytes: int = 4096
    input_rate: float = 1.0
    input_bytes: int = 64
    drain_s: float = 3.0
    token_keys: str = ""
    kid: str = ""
    max_wall_s: float = 600.0
    tick_s: float = 0.001
    lag_probe_s: float = 0.01
    heartbeat_s: float = 0.0  # the transports keep themselves alive
    source_addrs: list[str] = field(default_factory=list)


class RawRelayChannel:
    """The relay's protocol without the SDK: one data frame per message, no E2E, no acks."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seq = 0

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, url: str, session_id: str, role: str,
                   token: str) -> RawRelayChannel:
        """Upgrade, send the client hello and wait for the server hello."""
        ws = await http.ws_connect(f"{url}?session={session_id}&token={token}",
                                   compress=0, max_msg_size=1 << 17)
        await ws.send_str(client_hello(session_id, role, os.urandom(8).hex()).decode())
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                if json.loads(msg.data).get("type") == "server_hello":
                    return cls(ws)
            elif msg.type is not aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"closed before server_hello: {msg.type.name} {msg.data}")

    async def send(self, data: bytes) -> None:
        """Send ``data`` as one data frame."""
        await self.ws.send_bytes(encode_frame(Kind.DATA, self.seq, data))
        self.seq = (self.seq + 1) & 0xFFFFFFFF

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Payloads of the data frames received (heartbeats and events skipped)."""
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = decode_frame(msg.data)
                if frame.kind is Kind.DATA:
                    yield frame.payload

    async def close(self) -> None:
        """Close the WebSocket."""
        await self.ws.close()


class Peer:
    """One side of a session: its channel, its outgoing queue and its two flows."""

    def __init__(self, gen: ChannelGenerator, channel: Channel, out: Flow, into: Flow,
                 size: int) -> None:
        self.gen = gen
        self.channel = channel
        self.out = out  # the flow this peer sends
        self.into = into  # the flow this peer receives
        self.template = bytearray(os.urandom(max(STAMP.size, size)))
        self.due = 0  # messages the wheel asked for and the sender has not sent yet
        self.wake = asyncio.Event()
        self.seq = 0
        self.expect = -1

    def request(self) -> None:
        """Wheel action: one more message is due."""
        if self.gen.sending:
            self.due += 1
            self.wake.set()

    async def sender(self) -> None:
        """Send the due messages in order, stamping each right before ``send``."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.due:
                self.due -= 1
                now = monotonic_ns()
                STAMP.pack_into(self.template, 0, now, self.seq)
                self.seq = (self.seq + 1) & 0xFFFFFFFF
                if self.gen.t0 <= now < self.gen.t1:
                    self.out.sent_in_window += 1
                await self.channel.send(bytes(self.template))

    async def receiver(self) -> None:
        """Account every message from the other side until the channel ends."""
        gen = self.gen
        try:
            async for data in self.channel:
                now = monotonic_ns()
                ts, seq = STAMP.unpack_from(data)
                flow = self.into
                flow.received_total += 1
                if self.expect >= 0 and seq != self.expect:
                    flow.seq_gaps += 1
                self.expect = (seq + 1) & 0xFFFFFFFF
                if gen.t0 <= now < gen.t1:
                    flow.received_in_window += 1
                if gen.t0 <= ts < gen.t1:
                    flow.delivered_in_window += 1
                    flow.latency_us.record((now - ts) // 1000)
                if not gen.sending and not gen.in_flight():
                    gen.drained.set()
        except Exception as e:
            gen.count_error(f"receive: {type(e).__name__}: {str(e)[:120]}")
        if not gen.closing:
            gen.unexpected_disconnects += 1


class ChannelGenerator:
    """Opens this process's sessions over the configured transport and runs their traffic."""

    def __init__(self, cfg: ChannelConfig) -> None:
        if cfg.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {cfg.transport!r}")
        self.cfg = cfg
        self.t0 = self.t1 = NEVER
        self.sending = True
        self.closing = False
        self.drained = asyncio.Event()
        self.data, self.input, self.heartbeat = Flow(), Flow(), Flow()
        self.lag = LoopLagProbe(cfg.lag_probe_s)
        self.connect_us = Histogram()
        self.sessions_ok = self.sessions_failed = self.unexpected_disconnects = 0
        self.first_connect_ns = self.last_ready_ns = 0
        self.errors: dict[str, int] = {}
        self.cpu_marks: dict[str, float] = {}
        self.channels: list[Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.http: aiohttp.ClientSession | None = None
        tick_ns = int(cfg.tick_s * 1e9)
        # one wheel for the hosts' data, one for the participants' input
        self.wheels = [RateWheel(int(1e9 / rate), tick_ns, Peer.request) if rate > 0 else None
                       for rate in (cfg.data_rate, cfg.input_rate)]

    def count_error(self, message: str) -> None:
        """Count an error by its message (a bounded number of distinct messages)."""
        if message in self.errors or len(self.errors) < MAX_DISTINCT_ERRORS:
            self.errors[message] = self.errors.get(message, 0) + 1

    def in_flight(self) -> bool:
        """Tell whether messages sent in the window are still unaccounted for."""
        return (self.data.delivered_in_window < self.data.sent_in_window
                or self.input.delivered_in_window < self.input.sent_in_window)

    async def _open_pair(self, session_id: str, minter: TokenMinter | None) -> tuple[Channel,
                                                                                     Channel]:
        cfg = self.cfg
        if cfg.transport == "webrtc":
            ends = signalling_pair()
            host, participant = await asyncio.gather(open_webrtc("host", ends[0]),
                                                     open_webrtc("participant", ends[1]))
            return host, participant
        assert minter is not None and self.http is not None
        token = minter.mint(session_id)
        if cfg.transport == "ws-raw":
            raw_host = await RawRelayChannel.open(self.http, cfg.url, session_id, "host", token)
            raw_part = await RawRelayChannel.open(self.http, cfg.url, session_id, "participant",
                                                  token)
            return raw_host, raw_part
        psk = os.urandom(32)
        options = ChannelOptions(linger_s=1.0)
        sdk_host = connect(cfg.url, session_id=session_id, role="host", psk=psk, token=token,
                           options=options, http=self.http)
        sdk_part = connect(cfg.url, session_id=session_id, role="participant", psk=psk,
                           token=token, options=options, http=self.http)
        await sdk_host.start()
        await sdk_part.start()
        await asyncio.gather(sdk_host.wait_ready(), sdk_part.wait_ready())
        return sdk_host, sdk_part

    async def _open_session(self, index: int, minter: TokenMinter | None,
                            gate: asyncio.Semaphore) -> None:
        cfg = self.cfg
        if cfg.ramp_sessions_per_s > 0:
            due = cfg.start_ns + int(index / cfg.ramp_sessions_per_s * 1e9)
            await asyncio.sleep(max(0.0, (due - monotonic_ns()) / 1e9))
        async with gate:
            started = monotonic_ns()
            self.first_connect_ns = self.first_connect_ns or started
            try:
                async with asyncio.timeout(cfg.connect_timeout_s):
                    host_ch, part_ch = await self._open_pair(f"{cfg.session_prefix}-{index}",
                                                             minter)
            except Exception as e:
                self.sessions_failed += 1
                self.count_error(f"connect: {type(e).__name__}: {str(e)[:160]}")
                return
        self.connect_us.record((monotonic_ns() - started) // 1000)
        self.sessions_ok += 1
        self.last_ready_ns = monotonic_ns()
        self.channels += [host_ch, part_ch]
        host = Peer(self, host_ch, self.data, self.input, cfg.data_bytes)
        participant = Peer(self, part_ch, self.input, self.data, cfg.input_bytes)
        for peer in (host, participant):
            self.tasks += [asyncio.ensure_future(peer.sender()),
                           asyncio.ensure_future(peer.receiver())]
        for wheel, peer in zip(self.wheels, (host, participant), strict=True):
            if wheel is not None:
                wheel.add(peer)

    async def connect_all(self) -> None:
        """Open this process's share of the sessions (bounded concurrency)."""
        cfg = self.cfg
        if cfg.transport != "webrtc":
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        minter = TokenMinter(cfg.token_keys, cfg.kid) if cfg.token_keys else None
        gate = asyncio.Semaphore(cfg.connect_concurrency)
        cpu_before = _cpu_seconds()
        tasks = [asyncio.ensure_future(self._open_session(i, minter, gate))
                 for i in range(cfg.proc_index, cfg.total_sessions, cfg.procs)]
        _, pending = await asyncio.wait(tasks, timeout=cfg.connect_phase_timeout_s)
        for task in pending:
            task.cancel()
        self.sessions_failed += len(pending)
        self.cpu_marks["connect"] = _cpu_seconds() - cpu_before

    async def tick(self) -> None:
        """Drive the wheels every ``tick_s`` until the window ends."""
        while self.sending:
            now = monotonic_ns()
            if now >= self.t1:
                self.sending = False
                break
            for wheel in self.wheels:
                if wheel is not None:
                    wheel.run_due(now, now >= self.t0)
            await asyncio.sleep(self.cfg.tick_s)

    def set_window(self, t0: int, t1: int) -> None:
        """Fix the measured window and schedule the CPU samples at its edges."""
        self.t0, self.t1 = t0, t1
        self.lag.t0, self.lag.t1 = t0, t1
        loop = asyncio.get_running_loop()
        now = monotonic_ns()
        for name, at in (("t0", t0), ("t1", t1)):
            loop.call_later(max(0.0, (at - now) / 1e9), self._mark_cpu, name)

    def _mark_cpu(self, name: str) -> None:
        self.cpu_marks[name] = _cpu_seconds()
        self.cpu_marks[name + "_ns"] = monotonic_ns()

    async def drain(self) -> float:
        """Wait (bounded by ``drain_s``) for messages in flight; return the seconds waited."""
        start = monotonic_ns()
        if self.in_flight():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), self.cfg.drain_s)
        return (monotonic_ns() - start) / 1e9

    def connected_report(self) -> dict[str, Any]:
        """The ``connected`` event (the shape :mod:`loadgen` expects)."""
        return {"event": "connected", "proc": self.cfg.proc_index,
                "sessions_ok": self.sessions_ok, "sessions_failed": self.sessions_failed,
                "first_connect_ns": self.first_connect_ns, "last_ready_ns": self.last_ready_ns,
                "cpu_connect_s": self.cpu_marks.get("connect", 0.0),
                "connect_us": self.connect_us.to_json(), "errors": dict(self.errors)}

    def result(self, drain_waited_s: float) -> dict[str, Any]:
        """The ``result`` event (the shape :mod:`loadgen` expects)."""
        marks = self.cpu_marks
        window_s = (marks.get("t1_ns", 0) - marks.get("t0_ns", 0)) / 1e9
        cpu_s = marks.get("t1", 0.0) - marks.get("t0", 0.0)
        schedule = Histogram()
        for wheel in self.wheels:
            if wheel is not None:
                schedule.merge(wheel.late_us)
        return {"event": "result", "proc": self.cfg.proc_index, "pid": os.getpid(),
                "cpu_s": cpu_s, "window_s": window_s,
                "cpu_fraction": cpu_s / window_s if window_s > 0 else None,
                "lag_us": self.lag.lag_us.to_json(), "schedule_lag_us": schedule.to_json(),
                "data": self.data.to_json(), "input": self.input.to_json(),
                "heartbeat": self.heartbeat.to_json(), "bad_frames": 0, "other_frames": 0,
                "unexpected_disconnects": self.unexpected_disconnects,
                "drain_waited_s": drain_waited_s, "errors": dict(self.errors)}

    async def close_all(self, limit_s: float = 10.0) -> None:
        """Close every channel (bounded), then the HTTP session."""
        self.closing = True
        self.lag.running = False
        for task in self.tasks:
            task.cancel()
        if self.channels:
            closing = [asyncio.ensure_future(_quietly(ch.close)) for ch in self.channels]
            await asyncio.wait(closing, timeout=limit_s)
        if self.http is not None:
            await self.http.close()


async def _quietly(action: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        await action()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def run_worker() -> None:
    """Speak :mod:`loadgen`'s JSON-lines protocol on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = await open_stdin()
    raw = json.loads(await reader.readline())
    known = ChannelConfig.__dataclass_fields__
    cfg = ChannelConfig(**{k: v for k, v in raw.items() if k in known})
    loop.call_later(cfg.max_wall_s, os._exit, 3)
    gen = ChannelGenerator(cfg)
    lag_task = asyncio.ensure_future(gen.lag.run())
    tick_task = asyncio.ensure_future(gen.tick())
    await gen.connect_all()
    emit(gen.connected_report())
    line = await reader.readline()
    command = json.loads(line) if line else {}
    if command.get("cmd") == "window":
        gen.set_window(int(command["t0_ns"]), int(command["t1_ns"]))
        await tick_task
        emit(gen.result(await gen.drain()))
    gen.sending = False
    await gen.close_all()
    lag_task.cancel()
    sys.stdout.flush()
    os._exit(0)  # aiortc may leave tasks behind; the parent has what it needs


def main() -> None:
    """Entry point of the child process."""
    raise_nofile_limit()
    uvloop.run(run_worker())


if __name__ == "__main__":
    main()
