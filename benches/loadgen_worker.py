"""One load-generator process: pairs of picows clients (host + participant) on uvloop.

The parent (:mod:`loadgen`) starts this file as a child process and drives it over JSON lines
(:mod:`loadgen_process` has the protocol, the window bookkeeping and the reports). Each session is
a host and a participant speaking the relay protocol: both send the ``client_hello`` and wait for
``server_hello``; the host then sends data frames, the participant input frames back, both
heartbeats. Every frame carries its send time (``monotonic_ns``) after the 8-byte header.
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
from time import monotonic_ns

import uvloop
from bench_child import raise_nofile_limit
from bench_tokens import TokenMinter
from loadgen_process import GeneratorCore, WorkerConfig, run_generator
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HEADER = struct.Struct(">BBHI")
HEADER_TS = struct.Struct(">BBHIQ")
KIND_DATA = 1
KIND_HEARTBEAT = 2


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
        gen.note_received()

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


class Generator(GeneratorCore):
    """The sessions of one process: picows host and participant pairs."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.connections_opened = 0
        self.peers: list[Peer] = []
        self.data_template = bytearray(os.urandom(8 + max(8, config.data_bytes)))
        self.input_template = bytearray(os.urandom(8 + max(8, config.input_bytes)))
        self.hb_template = bytearray(16)
        self.data_wheel = self.add_wheel(config.data_rate, self._send_data)
        self.input_wheel = self.add_wheel(config.input_rate, self._send_input)
        self.hb_wheel = self.add_wheel(1.0 / config.heartbeat_s if config.heartbeat_s > 0 else 0,
                                       self._send_heartbeat)

    def _send_data(self, peer: Peer) -> None:
        if (not peer.closed and self.sending
                and self.in_window(peer.send_frame(KIND_DATA, self.data_template))):
            self.data.sent_in_window += 1

    def _send_input(self, peer: Peer) -> None:
        if (not peer.closed and self.sending
                and self.in_window(peer.send_frame(KIND_DATA, self.input_template))):
            self.input.sent_in_window += 1

    def _send_heartbeat(self, peer: Peer) -> None:
        if not peer.closed and self.sending:
            peer.hb_sent_ns = peer.send_frame(KIND_HEARTBEAT, self.hb_template)
            if self.in_window(peer.hb_sent_ns):
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
        await self.gather_sessions([asyncio.ensure_future(self._open_session(i, minter, gate))
                                    for i in range(cfg.proc_index, cfg.total_sessions,
                                                   cfg.procs)])

    async def close_all(self) -> None:
        """Close every connection with 1000 and wait (bounded) until they are gone."""
        await super().close_all()
        waits = []
        for peer in self.peers:
            if peer.transport is not None and not peer.closed:
                with contextlib.suppress(Exception):
                    peer.transport.send_close(WSCloseCode.OK)
                    peer.transport.disconnect()
                waits.append(peer.transport.wait_disconnected())
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=10.0)


def main() -> None:
    """Entry point of the child process."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    raise_nofile_limit()
    uvloop.run(run_generator(lambda raw: Generator(WorkerConfig(**raw))))


if __name__ == "__main__":
    main()
