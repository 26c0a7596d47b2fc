"""What a peer sent after the message that closed it never reaches anyone.

The relay reads a peer's frames itself; one TCP read can carry a valid frame, then one
that closes the connection, then more valid frames. RFC 6455 says nothing after a close
counts, and the protocol says the counterparts learn of the close by ``peer_left``: so
they get the frames before it, then ``peer_left``, and never the frames after it. A
marker frame from another sender, sent once ``peer_left`` has arrived, proves that
nothing else was on its way.

The last tests flood the relay with pings (or heartbeats) without ever reading the
answers: such a peer is a slow consumer of its own pongs and must be evicted like any
other, without hurting anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from rescue.frames import Kind, decode_frame, encode_frame
from tests.support.client import TestPeer, assert_relaying, client_hello, join
from tests.support.observe import admin_stats, free_port, wait_until
from tests.support.probes import (
    RawWebSocket,
    assert_still_serving,
    unique_session,
    wait_for_connections,
    ws_frame,
)
from tests.support.relay import RelayProcess
from tests.support.slow_reader import SlowReader, masked_frame

RelayFactory = Callable[..., RelayProcess]
RECEIVE_TIMEOUT_S = 10.0
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x1, 0x2, 0x8, 0x9

# One received thing: a decoded data frame's payload (bytes) or an event (dict).
Received = bytes | dict[str, Any]


def data_frame(payload: bytes, seq: int = 1) -> bytes:
    """The bytes of one protocol data frame (kind 1)."""
    return encode_frame(Kind.DATA, seq, payload)


def client_data(payload: bytes, seq: int = 1) -> bytes:
    """A data frame as one masked WebSocket binary message."""
    return ws_frame(OP_BINARY, data_frame(payload, seq))


# X: the message that ends the connection, (close code, reason) the sender gets for it,
# and the ``peer_left`` reason its counterparts get.
CLOSERS: dict[str, tuple[bytes, tuple[int, str], str]] = {
    "text-message": (ws_frame(OP_TEXT, b"a text message after the hello"),
                     (1003, "UNSUPPORTED_DATA"), "evicted"),
    "client-close": (ws_frame(OP_CLOSE, struct.pack(">H", 1000) + b"bye"),
                     (1000, "NORMAL"), "closed"),
    "frame-kind-9": (ws_frame(OP_BINARY, struct.pack(">BBHI", 1, 9, 3, 9) + b"abc"),
                     (1003, "UNSUPPORTED_DATA"), "evicted"),
    "bad-frame-version": (ws_frame(OP_BINARY, struct.pack(">BBHI", 2, 1, 3, 9) + b"abc"),
                          (4000, "PROTOCOL_ERROR"), "evicted"),
    "websocket-rsv1": (ws_frame(OP_BINARY, data_frame(b"X"), rsv=4),
                       (4000, "PROTOCOL_ERROR"), "evicted"),
}


async def join_raw(relay: RelayProcess, session_id: str, role: str,
                   peer_id: str) -> RawWebSocket:
    """A peer joined over a hand-written WebSocket (its server_hello read, nothing more)."""
    ws = await RawWebSocket.connect(
        relay.port, f"/ws?session={session_id}&token={relay.mint(session_id)}")
    try:
        await ws.send(ws_frame(OP_TEXT, client_hello(session_id, role, peer_id).encode()))
        fin, opcode, payload = await ws.read_frame()
        assert (fin, opcode) == (True, OP_TEXT), (fin, opcode, payload)
        assert json.loads(payload)["type"] == "server_hello", payload
    except BaseException:
        await ws.aclose()
        raise
    return ws


async def receive(peer: TestPeer) -> Received:
    """The next thing ``peer`` receives: a data frame's payload or an event."""
    msg = await peer.ws.receive(timeout=RECEIVE_TIMEOUT_S)
    if msg.type is aiohttp.WSMsgType.TEXT:
        event: dict[str, Any] = json.loads(msg.data)
        return event
    assert msg.type is aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
    frame = decode_frame(msg.data)
    assert frame.kind is Kind.DATA, frame
    return frame.payload


async def receive_until(peer: TestPeer, last: Callable[[Received], bool]) -> list[Received]:
    """Everything ``peer`` receives up to and including the first item ``last`` accepts."""
    out: list[Received] = []
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        while not out or not last(out[-1]):
            out.append(await receive(peer))
    return out


def is_event(kind: str, peer_id: str) -> Callable[[Received], bool]:
    return lambda item: isinstance(item, dict) and item.get("type") == kind and (
        item.get("peer_id") == peer_id)


def is_frame(item: Received) -> bool:
    return isinstance(item, bytes)


async def assert_closed_with(ws: RawWebSocket, expected: tuple[int, str]) -> None:
    """The raw peer gets a close frame with ``expected``; it answers, and the TCP
    connection ends."""
    outcome = await ws.read_close()
    assert outcome == expected, outcome
    with contextlib.suppress(ConnectionError):
        await ws.send(ws_frame(OP_CLOSE, struct.pack(">H", 1000)))
    await ws.assert_eof()


@pytest.mark.parametrize("closer", list(CLOSERS))
async def test_frames_after_a_participants_closing_message_are_dropped(
        relay: RelayProcess, http: aiohttp.ClientSession, closer: str) -> None:
    x, expected_close, left_reason = CLOSERS[closer]
    sid = unique_session("order-p")
    host = await join(http, relay, sid, "host", "host")
    raw = await join_raw(relay, sid, "participant", "raw-p")
    other = await join(http, relay, sid, "participant", "other-p")
    try:
        joins = await receive_until(host, is_event("peer_joined", "other-p"))
        assert [e["peer_id"] for e in joins if isinstance(e, dict)] == ["raw-p", "other-p"]

        await raw.send(client_data(b"A") + x + client_data(b"B", 2) + client_data(b"C", 3))
        got = await receive_until(host, is_event("peer_left", "raw-p"))
        await other.send_frame(b"D")  # the marker, from another sender
        got += await receive_until(host, is_frame)

        assert got == [b"A", {"type": "peer_left", "role": "participant", "peer_id": "raw-p",
                              "reason": left_reason}, b"D"]
        await assert_closed_with(raw, expected_close)
    finally:
        await raw.aclose()
        await other.close()
        await host.close()
    await wait_for_connections(relay, http, 0)


@pytest.mark.parametrize("closer", list(CLOSERS))
async def test_frames_after_a_hosts_closing_message_are_dropped(
        relay: RelayProcess, http: aiohttp.ClientSession, closer: str) -> None:
    x, expected_close, left_reason = CLOSERS[closer]
    sid = unique_session("order-h")
    raw = await join_raw(relay, sid, "host", "raw-h")
    part = await join(http, relay, sid, "participant", "part")
    new_host: TestPeer | None = None
    try:
        assert await receive(part) == {"type": "peer_joined", "role": "host",
                                       "peer_id": "raw-h"}

        await raw.send(client_data(b"A") + x + client_data(b"B", 2) + client_data(b"C", 3))
        got = await receive_until(part, is_event("peer_left", "raw-h"))
        # The marker: only a host sends to a participant, so a new host sends it.
        new_host = await join(http, relay, sid, "host", "new-h")
        await new_host.send_frame(b"D")
        got += await receive_until(part, is_frame)

        assert got == [
            b"A",
            {"type": "peer_left", "role": "host", "peer_id": "raw-h", "reason": left_reason},
            {"type": "peer_joined", "role": "host", "peer_id": "new-h"},
            b"D",
        ]
        await assert_closed_with(raw, expected_close)
    finally:
        await raw.aclose()
        if new_host is not None:
            await new_host.close()
        await part.close()
    await wait_for_connections(relay, http, 0)


# --- a peer that floods pings and never reads the answers -------------------------------

ADMIN_KEY = "close-ordering-admin-key"
SLOW_CONSUMER_TIMEOUT_S = 1.5
FLOOD_SETTINGS: dict[str, Any] = {
    "workers": 1,  # /debug/stats then describes the worker holding the session
    "write_high_water_bytes": 16384,
    "write_low_water_bytes": 4096,
    "slow_consumer_timeout_s": SLOW_CONSUMER_TIMEOUT_S,
    "close_timeout_s": 1.0,
    "heartbeat_s": 5.0,
    "log_level": "debug",
    # Heartbeats are binary messages and count against the rate limit; not under test here.
    "rate_messages_per_s": 1e9,
    "rate_messages_burst": 10**9,
    "rate_bytes_per_s": 1e12,
    "rate_bytes_burst": 10**12,
}
FLOOD_BOUND_S = SLOW_CONSUMER_TIMEOUT_S + 15.0  # flood start to eviction, generously


def flood_batch(kind: str) -> bytes:
    """About 32 KiB of WebSocket pings (125-byte payloads) or protocol heartbeats."""
    if kind == "ping":
        return b"".join(masked_frame(OP_PING, bytes(125)) for _ in range(256))
    heartbeat = encode_frame(Kind.HEARTBEAT, 7, bytes(120))
    return b"".join(masked_frame(OP_BINARY, heartbeat) for _ in range(256))


async def flood(peer: SlowReader, batch: bytes, until: float) -> None:
    """Write ``batch`` again and again (never reading) until the connection fails, the
    task is cancelled or ``until`` (loop time) passes."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError, TimeoutError):
        while loop.time() < until and not peer.writer.is_closing():
            peer.writer.write(batch)
            async with asyncio.timeout_at(until):
                await peer.writer.drain()


async def counters(relay: RelayProcess, http: aiohttp.ClientSession) -> dict[str, Any]:
    found: dict[str, Any] = (await admin_stats(http, relay, ADMIN_KEY))["counters"]
    return found


@pytest.mark.parametrize("kind", ["ping", "heartbeat"])
async def test_a_peer_flooding_pings_without_reading_is_evicted(
        relay_factory: RelayFactory, http: aiohttp.ClientSession, kind: str) -> None:
    relay = relay_factory(admin_port=free_port(), admin_key=ADMIN_KEY, **FLOOD_SETTINGS)
    sid = unique_session("flood")
    host = await join(http, relay, sid, "host", "host")
    pinger = await SlowReader.join(relay, sid, "participant", "pinger",
                                   rcvbuf=4096, stream_limit=4096)
    before = await counters(relay, http)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sender = loop.create_task(flood(pinger, flood_batch(kind), started + FLOOD_BOUND_S))
    try:
        async def evicted() -> dict[str, Any] | None:
            now = await counters(relay, http)
            done = now["slow_consumer_evictions"] > before["slow_consumer_evictions"]
            return now if done else None

        after = await wait_until(evicted, "the pinger's eviction", FLOOD_BOUND_S)
        # Evicted once over the high-water mark for slow_consumer_timeout_s, not before.
        assert SLOW_CONSUMER_TIMEOUT_S <= loop.time() - started < FLOOD_BOUND_S
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        assert after["slow_consumer_evictions"] == before["slow_consumer_evictions"] + 1
        assert after["flow_pauses"] > before["flow_pauses"]
        assert after["closes"].get("SLOW_CONSUMER", 0) == (
            before["closes"].get("SLOW_CONSUMER", 0) + 1)
        # The host, which reads, was told and stays connected.
        left = await receive_until(host, is_event("peer_left", "pinger"))
        assert left[-1] == {"type": "peer_left", "role": "participant", "peer_id": "pinger",
                            "reason": "evicted"}
        # What reaches the pinger now: its answers so far, then a 4005 close (or a reset,
        # when the relay dropped the connection it could not flush).
        messages, close = await pinger.read_until_close(within_s=RECEIVE_TIMEOUT_S)
        assert close in ((4005, "SLOW_CONSUMER"), None), close
        answer = 0xA if kind == "ping" else OP_BINARY  # pong, or the heartbeat echoed
        assert {opcode for opcode, _ in messages} <= {OP_TEXT, answer}, messages[:3]
        assert [op for op, _ in messages].count(answer) > 0, "the relay answered nothing"
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        pinger.close()
    # The host's connection is intact: it relays with a newcomer; and others are served.
    newcomer = await join(http, relay, sid, "participant", "newcomer")
    await assert_relaying(host, newcomer)
    await newcomer.close()
    await assert_still_serving(relay, http)
    stats = await admin_stats(http, relay, ADMIN_KEY)
    assert stats["counters"]["slow_consumer_evictions"] == (
        before["slow_consumer_evictions"] + 1)
    await host.close()
