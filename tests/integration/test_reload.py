"""Reload on SIGHUP: a new generation of workers takes over while the old one drains its
peers (``draining``, then 1012), every peer comes back on the new generation, an invalid
configuration is refused with the old workers still serving, and a valid change takes
effect in the new generation.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from rescue.ring import Ring
from tests.support.client import join
from tests.support.probes import hello_outcome
from tests.support.processes import pid_gone, wait_for_workers, worker_processes
from tests.support.reconnecting import ReconnectingPeer, Swarm, describe, unlimited_http
from tests.support.relay import RelayProcess

RELOAD: dict[str, Any] = {
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 10.0,
    "drain_window_s": 1.0,
    "drain_reconnect_spread_ms": 500,
}
SESSIONS = 100
SEND_INTERVAL_S = 0.2
# A reconnect (the attempts a peer makes after losing its connection) succeeds when a
# hello is answered within this long of the loss, not counting the reconnect_after_ms
# the relay asked the peer to wait first.
RECONNECT_WINDOW_S = 5.0
WAIT_S = 20.0


async def log_event(relay: RelayProcess, name: str, within_s: float = WAIT_S
                    ) -> dict[str, Any]:
    """Wait (off the event loop) for the next log record named ``name``."""
    return await asyncio.to_thread(relay.wait_for_event, name, within_s)


def write_config(path: Path, text: str) -> None:
    """Replace the TOML file the relay reads on reload."""
    path.write_text(text)


def one_session_per_slot(slots: int, prefix: str) -> list[str]:
    """A fresh session id for each slot of a ``slots``-worker node."""
    ring = Ring(range(slots))
    found: dict[int, str] = {}
    while len(found) < slots:
        sid = f"{prefix}-{uuid.uuid4().hex[:10]}"
        found.setdefault(ring.owner(sid), sid)
    return [found[s] for s in range(slots)]


async def assert_session_takes(http: aiohttp.ClientSession, relay: RelayProcess, sid: str,
                               participants: int) -> None:
    """``sid`` takes a host and ``participants`` participants that all hear the host, and
    refuses one more participant with 4003 SESSION_FULL."""
    host = await join(http, relay, sid, "host", "h")
    parts = [await join(http, relay, sid, "participant", f"p{i}")
             for i in range(participants)]
    try:
        await host.send_frame(b"to all")
        for part in parts:
            assert (await part.recv_frame()).payload == b"to all"
        assert await hello_outcome(http, relay, sid, peer_id="one-too-many") == \
            (4003, "SESSION_FULL")
    finally:
        for peer in (host, *parts):
            await peer.close()


async def test_hup_under_traffic_brings_every_session_back_on_the_new_generation(
        relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=2, **RELOAD)
    first = await wait_for_workers(relay, 2, 1, WAIT_S)
    sids = [f"reload-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    async with unlimited_http() as http:
        swarm = Swarm(ReconnectingPeer(http, relay, sid, role, f"{role}-{sid}",
                                       send_interval_s=SEND_INTERVAL_S,
                                       give_up_s=RECONNECT_WINDOW_S)
                      for sid in sids for role in ("host", "participant"))
        await swarm.start()
        try:
            await swarm.wait_all(lambda p: p.received >= 2, "exchanging before the reload",
                                 WAIT_S)
            relay.proc.send_signal(signal.SIGHUP)
            started = await log_event(relay, "reload.started")
            assert started["generation"] == 2
            completed = await log_event(relay, "reload.completed")
            assert completed["generation"] == 2
            await swarm.wait_all(
                lambda p: p.connects == 2 and p.connected and p.received_since_connect >= 3,
                "back on the new generation and exchanging", WAIT_S)
        finally:
            await swarm.stop()

    retried = 0
    for peer in swarm.peers:
        # Told once to reconnect, with the contract's event then close code.
        assert peer.closes == [(1012, "SERVER_SHUTDOWN")], describe(peer)
        assert len(peer.drainings) == 1, describe(peer)
        [reconnect] = peer.reconnects
        assert reconnect.cause == "close 1012 SERVER_SHUTDOWN", describe(peer)
        assert reconnect.delay_ms == peer.drainings[0]["reconnect_after_ms"]
        assert 0 <= reconnect.delay_ms <= RELOAD["drain_reconnect_spread_ms"]
        # Zero failed reconnects: joined within the window, and any attempt that did not
        # join was a retryable 503 answer (never a hard refusal or a reset).
        assert reconnect.succeeded and not reconnect.gave_up, describe(peer)
        assert reconnect.took_s is not None and reconnect.took_s <= RECONNECT_WINDOW_S
        assert all(a.startswith("HTTP 503") for a in reconnect.failed_attempts), \
            describe(peer)
        retried += bool(reconnect.failed_attempts)
        assert peer.ended is None, describe(peer)
    assert retried == 0, f"{retried} peers needed more than one attempt"

    second = await wait_for_workers(relay, 2, 2, WAIT_S)
    assert not set(second.values()) & set(first.values())
    assert all(pid_gone(pid) for pid in first.values())
    drained = relay.events("drain.completed")
    assert {r["pid"] for r in drained} >= set(first.values()), drained
    assert not relay.events("drain.deadline")


async def test_invalid_config_on_hup_is_refused_and_old_workers_keep_serving(
        relay_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    write_config(config, "max_participants = 2\n")
    relay: RelayProcess = relay_factory(workers=2, config=str(config), **RELOAD)
    first = await wait_for_workers(relay, 2, 1, WAIT_S)

    write_config(config, "max_participants = 0\n")
    relay.proc.send_signal(signal.SIGHUP)
    refused = await log_event(relay, "reload.refused")
    assert refused["level"] == "error", refused
    assert "max_participants" in refused["detail"], refused
    assert str(config) in refused["detail"], refused  # where the bad value came from

    assert not relay.events("reload.started")
    assert len(relay.events("worker.spawned")) == 2
    assert await wait_for_workers(relay, 2, 1, WAIT_S) == first
    # The old workers still serve every slot, with the old configuration.
    async with aiohttp.ClientSession() as http:
        for sid in one_session_per_slot(2, "refused"):
            await assert_session_takes(http, relay, sid, participants=2)
    assert set(worker_processes(relay)) == set(first.values())


async def test_valid_config_change_on_hup_takes_effect_in_the_new_generation(
        relay_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    write_config(config, "max_participants = 2\n")
    relay: RelayProcess = relay_factory(workers=2, config=str(config), **RELOAD)
    first = await wait_for_workers(relay, 2, 1, WAIT_S)
    async with aiohttp.ClientSession() as http:
        await assert_session_takes(http, relay, one_session_per_slot(2, "before")[0], 2)

        write_config(config, "max_participants = 1\n")
        relay.proc.send_signal(signal.SIGHUP)
        completed = await log_event(relay, "reload.completed")
        assert completed["generation"] == 2
        second = await wait_for_workers(relay, 2, 2, WAIT_S)
        assert not set(second.values()) & set(first.values())
        for sid in one_session_per_slot(2, "after"):
            await assert_session_takes(http, relay, sid, participants=1)
