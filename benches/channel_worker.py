"""A generator process whose sessions are message channels: WebRTC, the SDK's E2E channel, raw.

It is a :class:`loadgen_process.GeneratorCore` and speaks the same protocol as
:mod:`loadgen_worker`, so :func:`loadgen.run_load` drives it and :func:`loadgen.merge_results`
merges it unchanged. Its extra option ``transport`` picks how each
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
from dataclasses import dataclass
from time import monotonic_ns
from typing import Any, Protocol

import aiohttp
import uvloop
from bench_child import raise_nofile_limit
from bench_tokens import TokenMinter
from loadgen_process import GeneratorCore, WorkerConfig, run_generator
from loadgen_traffic import Flow
from ws_client import client_hello

from rescue.client.channel import ChannelOptions, connect
from rescue.client.webrtc import open_webrtc, signalling_pair
from rescue.frames import Kind, decode_frame, encode_frame

STAMP = struct.Struct(">QI")  # send time (monotonic_ns), sequence number
TRANSPORTS = ("webrtc", "ws-e2e", "ws-raw")


class Channel(Protocol):
    """What every transport gives a peer (the shape of the SDK's MessageChannel)."""

    async def send(self, data: bytes) -> None:
        """Send one message."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The other side's messages."""

    async def close(self) -> None:
        """Close the channel."""


@dataclass
class ChannelConfig(WorkerConfig):
    """:class:`loadgen_process.WorkerConfig` and the transport (``transport`` in
    ``LoadConfig.worker_options``)."""

    transport: str = "webrtc"


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
                if self.gen.in_window(now):
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
                if gen.in_window(now):
                    flow.received_in_window += 1
                if gen.in_window(ts):
                    flow.delivered_in_window += 1
                    flow.latency_us.record((now - ts) // 1000)
                gen.note_received()
        except Exception as e:
            gen.count_error(f"receive: {type(e).__name__}: {str(e)[:120]}")
        if not gen.closing:
            gen.unexpected_disconnects += 1


class ChannelGenerator(GeneratorCore):
    """Opens this process's sessions over the configured transport and runs their traffic."""

    def __init__(self, cfg: ChannelConfig) -> None:
        if cfg.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {cfg.transport!r}")
        super().__init__(cfg)
        self.cfg = cfg
        self.channels: list[Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.http: aiohttp.ClientSession | None = None
        # the hosts' data, the participants' input
        self.data_wheel = self.add_wheel(cfg.data_rate, Peer.request)
        self.input_wheel = self.add_wheel(cfg.input_rate, Peer.request)

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
        for wheel, peer in ((self.data_wheel, host), (self.input_wheel, participant)):
            if wheel is not None:
                wheel.add(peer)

    async def connect_all(self) -> None:
        """Open this process's share of the sessions (bounded concurrency)."""
        cfg = self.cfg
        if cfg.transport != "webrtc":
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        minter = TokenMinter(cfg.token_keys, cfg.kid) if cfg.token_keys else None
        gate = asyncio.Semaphore(cfg.connect_concurrency)
        await self.gather_sessions([asyncio.ensure_future(self._open_session(i, minter, gate))
                                    for i in range(cfg.proc_index, cfg.total_sessions,
                                                   cfg.procs)])

    async def close_all(self) -> None:
        """Close every channel (bounded), then the HTTP session; then end the process
        (aiortc may leave tasks behind, and the parent has what it needs)."""
        await super().close_all()
        for task in self.tasks:
            task.cancel()
        if self.channels:
            closing = [asyncio.ensure_future(_quietly(ch.close)) for ch in self.channels]
            await asyncio.wait(closing, timeout=10.0)
        if self.http is not None:
            await self.http.close()
        sys.stdout.flush()
        os._exit(0)


async def _quietly(action: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        await action()


def main() -> None:
    """Entry point of the child process."""
    raise_nofile_limit()
    uvloop.run(run_generator(lambda raw: ChannelGenerator(ChannelConfig(**raw))))


if __name__ == "__main__":
    main()
