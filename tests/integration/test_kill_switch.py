"""The kill switch across the workers of a node, without and with Redis.

A pause set through the admin API must reach every worker: new WebSocket upgrades are
refused 403 ``fallback_paused`` within the switch's poll interval plus the supervisor's
broadcast interval (memory mode) while sessions already open keep relaying; resume
restores upgrades; a hard pause also closes the open peers with 4008
``GUARDRAIL_TRIPPED``. Upgrades are aimed at each worker through sessions the ring gives
to that worker's slot.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.ring import Ring
from tests.support.client import TestPeer, assert_relaying, join_relaying_pair
from tests.support.controlplane import call, fallback_token
from tests.support.observe import wait_until
from tests.support.probes import Refused, assert_refusal, upgrade_headers
from tests.support.relay import RelayProcess

RelayFactory = Callable[..., RelayProcess]

WORKERS = 2
SERVICE_KEY = "kill-switch-service-key"
ADMIN_KEY = "kill-switch-admin-key"
PAUSE_POLL_S = 0.5
BROADCAST_S = 1.0  # worker beats and the supervisor's cluster broadcast, each about 1 s
# Memory mode: slot 0 reads its switch, beats it to the supervisor, which broadcasts it,
# and the other worker applies it at its next poll; a margin for a loaded machine.
PROPAGATION_S = 2 * PAUSE_POLL_S + 2 * BROADCAST_S + 2.0
IO_TIMEOUT_S = 10.0
HEALTH_SAMPLES = 12


def session_of_slot(slot: int) -> str:
    """A fresh session id that the ring over this node's slots gives to ``slot``."""
    ring = Ring(range(WORKERS))
    while True:
        sid = f"ks{slot}-{uuid.uuid4().hex[:12]}"
        if ring.owner(sid) == slot:
            return sid


async def switch(http: aiohttp.ClientSession, relay: RelayProcess, path: str,
                 expected: str, body: Any = None) -> None:
    """Flip the kill switch through the admin API and check the answer."""
    status, _, answer = await call(http, relay, path, body or {}, ADMIN_KEY)
    assert (status, answer["paused"]) == (200, expected), answer


async def upgrade_refused(http: aiohttp.ClientSession, relay: RelayProcess, slot: int) -> bool:
    """Try an upgrade on ``slot``: True if refused 403 fallback_paused, False if upgraded."""
    sid = session_of_slot(slot)
    async with http.get(relay.ws_url(sid, relay.mint(sid)), headers=upgrade_headers(),
                        timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        if resp.status == 101:
            resp.close()
            return False
        body = json.loads(await resp.text())
        assert_refusal(Refused(resp.status, dict(resp.headers), resp.content_type, body),
                       403, "fallback_paused")
        return True


async def every_worker_refuses(http: aiohttp.ClientSession, relay: RelayProcess) -> bool:
    return all([await upgrade_refused(http, relay, slot) for slot in range(WORKERS)])


async def every_worker_accepts(http: aiohttp.ClientSession, relay: RelayProcess) -> bool:
    return not any([await upgrade_refused(http, relay, slot) for slot in range(WORKERS)])


async def open_pair(http: aiohttp.ClientSession, relay: RelayProcess,
                    slot: int) -> tuple[TestPeer, TestPeer]:
    """A host and participant of a session of ``slot``, on a token from the token API."""
    sid = session_of_slot(slot)
    token = (await fallback_token(http, relay, sid, SERVICE_KEY))["token"]
    return await join_relaying_pair(http, relay, sid, token)


async def health_pause_states(http: aiohttp.ClientSession, relay: RelayProcess) -> set[str]:
    """``fallback_paused`` of ``/healthz`` over several fresh connections (both workers)."""
    states = set()
    for _ in range(HEALTH_SAMPLES):
        async with http.get(relay.http_url("/healthz"),
                            timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
            states.add((await resp.json())["fallback_paused"])
    return states


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_kill_switch_reaches_every_worker(
        relay_factory: RelayFactory, key_dir: Path, fresh_http: aiohttp.ClientSession,
        request: pytest.FixtureRequest, store: str) -> None:
    settings: dict[str, Any] = {
        "workers": WORKERS, "service_keys": SERVICE_KEY, "admin_key": ADMIN_KEY,
        "signing_keys": str(key_dir), "pause_poll_s": PAUSE_POLL_S}
    if store == "redis":
        settings["redis_url"] = request.getfixturevalue("redis_server").url
    relay = relay_factory(**settings)
    http = fresh_http
    pairs = [await open_pair(http, relay, slot) for slot in range(WORKERS)]
    assert await health_pause_states(http, relay) == {"off"}

    # Soft pause: new upgrades refused on every worker, open sessions keep relaying.
    await switch(http, relay, "/admin/pause", "soft")
    await wait_until(lambda: every_worker_refuses(http, relay),
                     "every worker to refuse upgrades", within_s=PROPAGATION_S)
    assert await health_pause_states(http, relay) == {"soft"}
    for host, part in pairs:
        await assert_relaying(host, part)
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": session_of_slot(1)}, SERVICE_KEY)
    assert (status, body["error"]) == (403, "fallback_paused")

    # Resume: every worker upgrades again.
    await switch(http, relay, "/admin/resume", "off")
    await wait_until(lambda: every_worker_accepts(http, relay),
                     "every worker to accept upgrades", within_s=PROPAGATION_S)
    assert await health_pause_states(http, relay) == {"off"}
    pairs += [await open_pair(http, relay, slot) for slot in range(WORKERS)]
    for host, part in pairs:
        await assert_relaying(host, part)

    # Hard pause: every open peer, on every worker, is closed with GUARDRAIL_TRIPPED.
    await switch(http, relay, "/admin/pause", "hard", {"hard": True})
    peers = [peer for pair in pairs for peer in pair]
    closes = await asyncio.gather(*(p.recv_close(timeout=PROPAGATION_S) for p in peers))
    assert closes == [(4008, "GUARDRAIL_TRIPPED")] * len(peers)
    assert await every_worker_refuses(http, relay)
    assert await health_pause_states(http, relay) == {"hard"}


async def test_without_redis_a_reload_keeps_the_kill_switch(
        relay_factory: RelayFactory, key_dir: Path, fresh_http: aiohttp.ClientSession) -> None:
    relay = relay_factory(workers=WORKERS, service_keys=SERVICE_KEY, admin_key=ADMIN_KEY,
                          signing_keys=str(key_dir), pause_poll_s=PAUSE_POLL_S)
    http = fresh_http
    await switch(http, relay, "/admin/pause", "soft")
    await wait_until(lambda: every_worker_refuses(http, relay),
                     "every worker to refuse upgrades", within_s=PROPAGATION_S)
    relay.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(relay.wait_for_event, "reload.completed", 30.0)
    assert await health_pause_states(http, relay) == {"soft"}
    assert await every_worker_refuses(http, relay)
