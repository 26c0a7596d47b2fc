"""Drain: SIGTERM tells every peer to reconnect (``draining``, then 1012) and exits 0 within
``drain_timeout_s``; SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import aiohttp

from tests.support.client import (
    TestPeer,
    client_hello,
    join,
    messages_until_close,
    open_ws,
)
from tests.support.observe import (
    admin_stats,
    find_log,
    free_port,
    wait_for_exit,
    wait_for_log,
    wait_until,
)
from tests.support.relay import RelayProcess
from tests.support.slow_reader import SlowReader

ADMIN_KEY = "drain-admin-key"
TIMEOUT_S = 10.0
DRAIN_SETTINGS: dict[str, Any] = {
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 4.0,
    "drain_window_s": 0.5,
    "drain_reconnect_spread_ms": 800,
    "log_level": "debug",
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_told_to_reconnect(received: list[Any], close: tuple[int, str]) -> None:
    """A ``draining`` event with a delay, nothing after it, then 1012 SERVER_SHUTDOWN."""
    drains = [i for i, m in enumerate(received)
              if isinstance(m, dict) and m.get("type") == "draining"]
    assert len(drains) == 1, received
    event = received[drains[0]]
    assert set(event) == {"type", "reconnect_after_ms"}, event
    assert isinstance(event["reconnect_after_ms"], int), event
    assert 0 <= event["reconnect_after_ms"] <= DRAIN_SETTINGS["drain_reconnect_spread_ms"]
    assert drains[0] == len(received) - 1, f"messages after the draining event: {received}"
    assert close == (1012, "SERVER_SHUTDOWN")


async def test_sigterm_drains_every_peer_and_exits_0(relay_factory: Any,
                                                     http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(**DRAIN_SETTINGS)
    async with http.get(relay.http_url("/readyz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    sid = unique("drain")
    host = await join(http, relay, sid, "host", "h")
    parts = [await join(http, relay, sid, "participant", f"p{i}") for i in range(2)]
    other = await join(http, relay, unique("drain-other"), "host", "h")
    peers = [host, *parts, other]
    for _ in parts:
        await host.recv_event()
    for p in parts:
        assert await p.recv_event() == {"type": "peer_joined", "role": "host", "peer_id": "h"}

    loop = asyncio.get_running_loop()
    signalled_at = loop.time()
    relay.proc.send_signal(signal.SIGTERM)
    outcomes = await asyncio.gather(*(messages_until_close(p) for p in peers))
    for received, close in outcomes:
        # Peers of the same session may hear each other leave before their own turn.
        assert all(isinstance(m, dict) and m["type"] in ("draining", "peer_left")
                   for m in received), received
        assert_told_to_reconnect(received, close)
    status = await wait_for_exit(relay, DRAIN_SETTINGS["drain_timeout_s"] + 2)
    assert status == 0
    assert loop.time() - signalled_at < DRAIN_SETTINGS["drain_timeout_s"]
    relay.stop()  # collects the rest of its log
    # Every worker finished its drain before the deadline.
    assert len(find_log(relay, "drain.completed")) == len(find_log(relay, "drain.started")) >= 1
    assert not find_log(relay, "drain.deadline")


async def test_sigterm_with_a_stuck_peer_still_exits_0_within_the_deadline(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    # One worker: /debug/stats then describes the worker that holds the session.
    settings = dict(DRAIN_SETTINGS, workers=1, admin_port=free_port(), admin_key=ADMIN_KEY,
                    write_high_water_bytes=65536, write_low_water_bytes=16384,
                    slow_consumer_timeout_s=30.0, rate_messages_per_s=1e9,
                    rate_messages_burst=10**9, rate_bytes_per_s=1e12, rate_bytes_burst=10**12)
    relay: RelayProcess = relay_factory(**settings)
    sid = unique("stuck")
    host = await join(http, relay, sid, "host", "h")
    stuck = await SlowReader.join(relay, sid, "participant", "stuck")
    try:
        # The host streams until the relay holds it back for the stuck participant, whose
        # buffers are full: the relay cannot deliver it a close frame.
        paused = asyncio.Event()

        async def stream() -> None:
            while not paused.is_set():
                await host.send_frame(bytes(4096))
                await asyncio.sleep(0)

        sender = asyncio.get_running_loop().create_task(stream())

        async def flow_paused() -> bool:
            stats = await admin_stats(http, relay, ADMIN_KEY)
            return bool(stats["counters"]["flow_pauses"] > 0)

        await wait_until(flow_paused, "the relay to hold the host back")
        paused.set()

        loop = asyncio.get_running_loop()
        signalled_at = loop.time()
        relay.proc.send_signal(signal.SIGTERM)
        received, close = await messages_until_close(host)
        assert_told_to_reconnect([m for m in received if isinstance(m, dict)], close)
        status = await wait_for_exit(relay, settings["drain_timeout_s"] + 5)
        elapsed = loop.time() - signalled_at
        assert status == 0
        assert elapsed < settings["drain_timeout_s"] + 0.5, elapsed
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    finally:
        stuck.close()


async def test_sigint_exits_promptly(relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(**dict(DRAIN_SETTINGS, drain_timeout_s=30.0))
    sid = unique("sigint")
    host = await join(http, relay, sid, "host", "h")
    part = await join(http, relay, sid, "participant", "p")
    loop = asyncio.get_running_loop()
    signalled_at = loop.time()
    relay.proc.send_signal(signal.SIGINT)
    for peer in (host, part):
        received, close = await messages_until_close(peer)
        # Not a restart to wait out: no draining event, and "going away" rather than 1012.
        assert not any(isinstance(m, dict) and m["type"] == "draining" for m in received)
        assert close == (1001, "GOING_AWAY")
    status = await wait_for_exit(relay, TIMEOUT_S)
    assert status == 0
    assert loop.time() - signalled_at < DRAIN_SETTINGS["close_timeout_s"] + 2.0
    relay.stop()  # collects the rest of its log
    assert not find_log(relay, "drain.started")


async def test_a_connection_still_in_its_handshake_is_drained_too(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    settings = dict(DRAIN_SETTINGS, handshake_timeout_s=30.0)
    relay: RelayProcess = relay_factory(**settings)
    sid = unique("late-hello")
    host = await join(http, relay, sid, "host", "h")
    pending = await open_ws(http, relay.ws_url(sid, relay.mint(sid)))  # upgraded, no hello
    loop = asyncio.get_running_loop()
    signalled_at = loop.time()
    relay.proc.send_signal(signal.SIGTERM)
    assert_told_to_reconnect(*await messages_until_close(host))
    await wait_for_log(relay, "drain.started")
    # The hello comes in while the node drains: the newcomer must be sent away as well
    # (a server_hello first is fine), not joined and forgotten until the deadline.
    await pending.send_str(client_hello(sid, "participant", "late"))
    late = TestPeer(pending, sid, "participant", "late")
    received, close = await messages_until_close(late)
    received = [m for m in received
                if not (isinstance(m, dict) and m["type"] in ("server_hello", "peer_joined"))]
    assert_told_to_reconnect(received, close)
    status = await wait_for_exit(relay, settings["drain_timeout_s"] + 5)
    assert status == 0
    assert loop.time() - signalled_at < settings["drain_timeout_s"]
