"""Liveness: silent peers are pinged then closed (4006), ponging peers stay, data idleness
closes (4006), and a connection that never says hello is closed (4001).

The relay's own sweeps are the clock: tests wait for pings, closes and events, never for
a fixed time. Durations are only checked from below (a slow machine makes them longer).
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.frames import Kind, decode_frame, encode_frame
from rescue.keys import SigningKey
from tests.support.client import join, join_peer, open_ws
from tests.support.observe import admin_stats, find_log, free_port, wait_for_log
from tests.support.relay import RelayProcess, start_relay

HEARTBEAT_S = 0.5
MISSED = 3
HANDSHAKE_TIMEOUT_S = 0.5
ADMIN_KEY = "liveness-admin-key"
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def live_relay(key_dir: Path, signing_key: SigningKey,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A relay with a 0.5 s heartbeat, 3 missed heartbeats and a 0.5 s handshake timeout."""
    proc = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("live"),
                       workers=1, heartbeat_s=HEARTBEAT_S, missed_heartbeats=MISSED,
                       handshake_timeout_s=HANDSHAKE_TIMEOUT_S, session_grace_s=1.0,
                       admin_port=free_port(), admin_key=ADMIN_KEY, log_level="debug")
    yield proc
    proc.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_silent_peer_is_pinged_then_closed_while_a_ponging_peer_stays(
        live_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    relay = live_relay
    sid = unique("silent")
    loop = asyncio.get_running_loop()
    # The host answers pings (autoping, with a receive always pending) and sends nothing.
    host = await join(http, relay, sid, "host", "h",
                      token=relay.mint(sid, caps=["fallback-ws", "telemetry"]))
    host_joined_at = loop.time()
    silent = await join_peer(http, relay, sid, "participant", "s", autoping=False)
    silent_joined_at = loop.time()

    async def host_events() -> list[dict[str, Any]]:
        # Keeps a receive pending all along, so aiohttp answers the relay's pings.
        events = []
        while not events or events[-1]["type"] != "peer_left":
            events.append(await host.recv_event(timeout=TIMEOUT_S))
        return events

    host_task = loop.create_task(host_events())

    pings = 0
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            msg = await silent.ws.receive()
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1  # seen, never answered
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                continue  # peer_joined for the host
            break
    closed_after = loop.time() - silent_joined_at
    assert msg.type is aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
    assert (msg.data, msg.extra) == (4006, "IDLE_TIMEOUT")
    assert pings >= 1
    # Closed after missed_heartbeats sweeps, the first of which may come right after joining.
    assert closed_after >= (MISSED - 1) * HEARTBEAT_S * 0.9
    await wait_for_log(relay, "peer.idle_timeout",
                       connection_id=silent.server_hello["connection_id"])

    assert await host_task == [
        {"type": "peer_joined", "role": "participant", "peer_id": "s"},
        {"type": "peer_left", "role": "participant", "peer_id": "s", "reason": "timeout"}]
    # The host, silent for longer than the closed peer, is still connected: its pongs count.
    assert loop.time() - host_joined_at > closed_after
    assert not host.ws.closed
    stats = await admin_stats(http, relay, ADMIN_KEY, session=sid)
    (member,) = stats["session"]["members"]
    assert member["connection_id"] == host.server_hello["connection_id"]
    assert member["rx_msgs"] >= 1  # pongs only: the host never sent a frame (telemetry on)
    heartbeat = encode_frame(Kind.HEARTBEAT, 1, b"still here")
    await host.send_raw(heartbeat)
    assert (await host.recv_frame()).payload == b"still here"
    await host.close()


async def test_handshake_timeout_closes_a_connection_without_hello(
        live_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("nohello")
    loop = asyncio.get_running_loop()
    ws = await open_ws(http, live_relay.ws_url(sid, live_relay.mint(sid)))
    opened_at = loop.time()
    msg = await ws.receive(timeout=TIMEOUT_S)
    assert msg.type is aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
    assert (msg.data, msg.extra) == (4001, "HANDSHAKE_TIMEOUT")
    assert loop.time() - opened_at >= HANDSHAKE_TIMEOUT_S * 0.9
    await ws.close()


async def test_connection_without_a_request_is_dropped(live_relay: RelayProcess,
                                                     http: aiohttp.ClientSession) -> None:
    # The worker's intake peeks for a request line; none within handshake_timeout_s: it
    # answers the contract's JSON error (408) and closes, before aiohttp sees the socket.
    before = await admin_stats(http, live_relay, ADMIN_KEY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", live_relay.port))
        opened_at = loop.time()
        data = b""
        async with asyncio.timeout(TIMEOUT_S):
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
        closed_after = loop.time() - opened_at
        assert HANDSHAKE_TIMEOUT_S * 0.9 <= closed_after < HANDSHAKE_TIMEOUT_S + 4.0
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), data
        assert b"\r\nContent-Type: application/json\r\n" in head, data
        assert json.loads(body)["error"] == "bad_request", data
    finally:
        sock.close()
    after = await admin_stats(http, live_relay, ADMIN_KEY)
    assert after["intake"]["peek_timeouts"] == before["intake"]["peek_timeouts"] + 1
    assert after["counters"]["header_timeouts"] == before["counters"]["header_timeouts"]


async def test_data_idle_timeout_closes_a_peer_that_sends_only_heartbeats(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    data_idle_s = 1.5
    relay = relay_factory(heartbeat_s=HEARTBEAT_S, missed_heartbeats=MISSED,
                          data_idle_timeout_s=data_idle_s, log_level="debug")
    loop = asyncio.get_running_loop()
    # A pair that relays data: the host answers each relay ping with a data frame (the
    # pings pace it), the participant receives them and answers pings with pongs.
    pair = unique("pair")
    host = await join_peer(http, relay, pair, "host", "h", autoping=False)
    part = await join(http, relay, pair, "participant", "p")
    pair_joined_at = loop.time()
    frames_seen = 0

    async def host_loop() -> None:
        while True:
            msg = await host.ws.receive(timeout=TIMEOUT_S)
            if msg.type is aiohttp.WSMsgType.PING:
                await host.send_frame(b"data keeps us alive")
            elif msg.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"host got {msg.type!r} {msg.data!r} {msg.extra!r}")

    async def part_loop() -> None:
        nonlocal frames_seen
        while True:
            frame = await part.recv_frame(timeout=TIMEOUT_S)
            assert frame.payload == b"data keeps us alive"
            frames_seen += 1

    pair_tasks = [loop.create_task(host_loop()), loop.create_task(part_loop())]
    # A peer alone in its session that answers each relay ping with a heartbeat frame:
    # never silent, but it relays nothing.
    lone = await join_peer(http, relay, unique("lone"), "participant", "hb", autoping=False)
    lone_joined_at = loop.time()
    echoes = 0
    try:
        async with asyncio.timeout(data_idle_s + 4 * HEARTBEAT_S + 2):
            while True:
                msg = await lone.ws.receive()
                if msg.type is aiohttp.WSMsgType.PING:
                    await lone.send_frame(b"", Kind.HEARTBEAT)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    assert decode_frame(msg.data).kind is Kind.HEARTBEAT
                    echoes += 1
                else:
                    break
        closed_after = loop.time() - lone_joined_at
        assert msg.type is aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
        assert (msg.data, msg.extra) == (4006, "IDLE_TIMEOUT")
        assert echoes >= 1  # it was not silent: the relay answered its heartbeats
        assert closed_after >= data_idle_s * 0.9
        lone_id = lone.server_hello["connection_id"]
        await wait_for_log(relay, "peer.data_idle", connection_id=lone_id)
        assert not find_log(relay, "peer.idle_timeout", connection_id=lone_id)

        # The pair relayed data all along and outlived the data-idle timeout.
        assert loop.time() - pair_joined_at > data_idle_s
        assert frames_seen >= 1
        assert not any(t.done() for t in pair_tasks), [t.exception() for t in pair_tasks
                                                        if t.done()]
        assert not host.ws.closed and not part.ws.closed
        for peer in (host, part):
            assert not find_log(relay, "peer.data_idle",
                                connection_id=peer.server_hello["connection_id"])
    finally:
        for task in pair_tasks:
            task.cancel()
        await asyncio.gather(*pair_tasks, return_exceptions=True)
        await lone.close()
        await part.close()
        await host.close()
