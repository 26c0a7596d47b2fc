"""Control-plane routing without a balancer: three relay nodes register in a real Redis,
a standalone control plane answers each token with the ``relay_url`` of the node that owns
the session (rendezvous hash over the registry's active nodes). Both peers of every
session get the same node, sessions spread over all three, a node stopped with SIGTERM
leaves the active set before its peers move (they ask for a new token and land on
another node), and a node that dies is dropped when its registry entry expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rescue.cluster.redis_registry import RedisRegistry
from rescue.cluster.registry import node_views
from rescue.keys import SigningKey
from rescue.ring import Ring
from tests.support.client import TestPeer, join_relaying_pair
from tests.support.nodes import ControlPlaneProcess, RoutedPeer, kill_node, start_nodes
from tests.support.observe import find_log, free_port, wait_for_exit, wait_for_log, wait_until
from tests.support.reconnecting import Swarm, describe, unlimited_http
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.relay import RelayProcess

NODES = 3
SESSIONS = 300
CONCURRENCY = 50
BALANCE_BOUND = (60, 140)  # of 300 over 3 nodes: rendezvous is even; binomial sd ~8
SERVICE_KEY = "routing-service-key"
WAIT_S = 20.0
REGISTRY_TTL_S = 2.0
SETTINGS: dict[str, Any] = {
    "workers": 1,
    "control_plane": False,
    "registry_ttl_s": REGISTRY_TTL_S,
    "drain_notice_s": 0.5,  # covers a token request that read the registry just before
    "drain_window_s": 1.0,
    "drain_timeout_s": 8.0,
    "drain_reconnect_spread_ms": 300,
    "heartbeat_s": 5.0,
    "log_level": "info",
}


@dataclass
class Fleet:
    """Redis, the nodes and the control plane."""

    redis: RedisServer
    nodes: list[RelayProcess]
    control_plane: ControlPlaneProcess

    def url_of(self, node: RelayProcess) -> str:
        return f"ws://127.0.0.1:{node.port}/ws"

    def name_of_url(self, url: str) -> str:
        return next(f"node-{i}" for i, n in enumerate(self.nodes) if self.url_of(n) == url)


@pytest.fixture(scope="module")
def fleet(key_dir: Path, signing_key: SigningKey,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    redis_binary = redis_server_binary()
    if redis_binary is None:
        pytest.skip("redis-server is needed (scripts/dev.sh installs it)")
    base = tmp_path_factory.mktemp("multinode-routing")
    (base / "redis").mkdir()
    redis = RedisServer(redis_binary, base / "redis")
    redis.start()
    nodes: list[RelayProcess] = []
    control_plane: ControlPlaneProcess | None = None
    try:
        nodes = start_nodes(NODES, key_dir, signing_key, base,
                            registry_redis_url=redis.url, **SETTINGS)
        control_plane = ControlPlaneProcess(
            base / "cp", redis_url=redis.url, registry_redis_url=redis.url,
            registry_ttl_s=REGISTRY_TTL_S, service_keys=SERVICE_KEY,
            signing_keys=str(key_dir), mint_rate_per_session_per_min=10000,
            mint_rate_per_service_key_per_s=10000, log_level="info")
        assert control_plane.listening["relay_routing"] == "registry"
        fleet = Fleet(redis, nodes, control_plane)
        wait_registered(fleet)
        yield fleet
    finally:
        if control_plane is not None:
            assert control_plane.stop() == 0
        for node in nodes:
            node.stop()
        redis.stop()


def wait_registered(fleet: Fleet) -> None:
    """Block until every node is listed active (each registers when it starts serving)."""
    async def check() -> bool:
        return await registry_view(fleet) == {f"node-{i}": "active" for i in range(NODES)}

    asyncio.run(wait_until(check, "every node registered", WAIT_S))


async def registry_view(fleet: Fleet) -> dict[str, str]:
    """Node id → state, as the registry holds them now."""
    registry = RedisRegistry(fleet.redis.url)
    try:
        return {v.node_id: v.state for v in node_views(await registry.read(), REGISTRY_TTL_S)}
    finally:
        await registry.close()


class At:
    """The relay-like face of one node URL (for the plain test peers)."""

    def __init__(self, relay_url: str) -> None:
        self.base = relay_url.replace("ws://", "http://", 1)

    def ws_url(self, session: str, token: str | None) -> str:
        return f"{self.base}?session={session}&token={token}"


async def test_a_node_serves_while_its_registry_is_unreachable(relay_factory: Any) -> None:
    """Fail soft: with nothing listening at the registry's address the node starts,
    relays a session and says in its log that registering failed."""
    node: RelayProcess = relay_factory(
        registry_redis_url=f"redis://127.0.0.1:{free_port()}/0", registry_ttl_s=1.0,
        redis_timeout_s=0.2, control_plane=False)
    async with unlimited_http() as http:
        host, part = await join_relaying_pair(http, node, "offline-registry",
                                              node.mint("offline-registry"))
        await host.close()
        await part.close()
    failed = await wait_for_log(node, "registry.publish_failed", WAIT_S)
    assert failed["failures"] >= 1 and "node keeps serving" in failed["detail"]
    assert not find_log(node, "registry.registered")


async def test_300_sessions_both_peers_get_one_node_spread_over_all_three(
        fleet: Fleet) -> None:
    sids = [f"rt-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    ring = Ring(sorted(f"node-{i}" for i in range(NODES)))
    gate = asyncio.Semaphore(CONCURRENCY)
    placed: Counter[str] = Counter()
    async with unlimited_http() as http:

        async def pair(sid: str) -> tuple[TestPeer, TestPeer]:
            async with gate:
                # Host and participant ask separately, as their clients would.
                (s1, host_body), (s2, part_body) = await asyncio.gather(
                    fleet.control_plane.token(http, sid, SERVICE_KEY),
                    fleet.control_plane.token(http, sid, SERVICE_KEY))
                assert s1 == s2 == 200, (host_body, part_body)
                url = host_body["relay_url"]
                assert part_body["relay_url"] == url
                assert fleet.name_of_url(url) == ring.owner(sid)  # the workers' own hash
                placed[fleet.name_of_url(url)] += 1
                return await join_relaying_pair(http, At(url), sid, host_body["token"])

        pairs = await asyncio.gather(*(pair(sid) for sid in sids))
        try:
            low, high = BALANCE_BOUND
            assert sum(placed.values()) == SESSIONS
            assert len(placed) == NODES and all(low <= n <= high for n in placed.values()), \
                placed
        finally:
            await asyncio.gather(*(p.close() for pair_ in pairs for p in pair_))


async def test_a_reload_keeps_the_node_active_in_the_registry(fleet: Fleet) -> None:
    """SIGHUP: the old generation drains but the node does not leave (no notice, never
    draining or missing in the registry), and the old worker's record is withdrawn."""
    node = fleet.nodes[0]
    registry = RedisRegistry(fleet.redis.url)
    seen: list[tuple[str | None, int]] = []  # (state, worker records) of node-0

    async def sample() -> None:
        while True:
            views = {v.node_id: v for v in node_views(await registry.read(), REGISTRY_TTL_S)}
            view = views.get("node-0")
            seen.append((None, 0) if view is None else (view.state, view.workers))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        await wait_until(lambda: asyncio.sleep(0, bool(seen)), "a first sample", WAIT_S)
        [old_pid] = {r["pid"] for r in find_log(node, "registry.registered")}
        node.proc.send_signal(signal.SIGHUP)
        await wait_for_log(node, "reload.completed", WAIT_S)

        async def settled() -> bool:  # the old generation's record withdrawn
            return bool(find_log(node, "registry.withdrawn")) and seen[-1] == ("active", 1)

        await wait_until(settled, "the old generation to leave the registry", WAIT_S)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await registry.close()
    assert all(state == "active" for state, _ in seen), seen
    assert not find_log(node, "drain.notice")
    # The new generation's record was written before the old one was withdrawn.
    order = [(r["event"], r["pid"]) for r in map(json_record, node.lines)
             if r.get("event") in ("registry.registered", "registry.withdrawn")]
    new = next(i for i, (event, pid) in enumerate(order)
               if event == "registry.registered" and pid != old_pid)
    gone = order.index(("registry.withdrawn", old_pid))
    assert new < gone, order


def json_record(line: str) -> dict[str, Any]:
    """A log line as a dict (empty for a line that is not JSON)."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


async def test_sigterm_one_node_leaves_the_active_set_and_no_session_fails(
        fleet: Fleet) -> None:
    victim, victim_name = fleet.nodes[1], "node-1"
    victim_url = fleet.url_of(victim)
    sids = [f"rs-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    async with unlimited_http() as http:
        swarm = Swarm(RoutedPeer(http, sid, role, f"{role}-{sid}",
                                 control_plane=fleet.control_plane, service_key=SERVICE_KEY,
                                 send_interval_s=1.0, give_up_s=WAIT_S)
                      for sid in sids for role in ("host", "participant"))
        await swarm.start(CONCURRENCY)
        try:
            await swarm.wait_all(lambda p: p.received >= 1, "exchanging", WAIT_S)
            on_victim = [p for p in swarm.peers if p.urls[0] == victim_url]
            assert on_victim
            loop = asyncio.get_running_loop()
            signalled_at = loop.time()
            victim.proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return (await registry_view(fleet)).get(victim_name) == "draining"

            await wait_until(draining, "the node to say it is draining", WAIT_S)
            assert victim.proc.poll() is None  # it says so before it goes
            # New sessions now: none is sent to the stopping node.
            fresh = [f"rn-{i}-{uuid.uuid4().hex[:8]}" for i in range(30)]
            for sid in fresh:
                status, body = await fleet.control_plane.token(http, sid, SERVICE_KEY)
                assert status == 200 and body["relay_url"] != victim_url, body
            status = await wait_for_exit(victim, SETTINGS["drain_timeout_s"] + 5)
            assert status == 0
            assert loop.time() - signalled_at < SETTINGS["drain_timeout_s"]
            await swarm.wait_all(lambda p: p.connected and p.received_since_connect >= 2,
                                 "exchanging after the node left", WAIT_S)
        finally:
            await swarm.stop()

    assert victim.events("drain.completed") and not victim.events("drain.deadline")
    for peer in swarm.peers:
        assert peer.ended is None, describe(peer)
        if peer not in on_victim:
            assert peer.connects == 1 and not peer.reconnects, describe(peer)
            continue
        # Told once; asked the control plane again; went to another node at once.
        assert peer.closes == [(1012, "SERVER_SHUTDOWN")], describe(peer)
        [reconnect] = peer.reconnects
        assert reconnect.succeeded and not reconnect.failed_attempts, describe(peer)
        assert peer.urls[-1] != victim_url, peer.urls
    # The two peers of each moved session were sent to the same new node.
    new_homes: dict[str, set[str]] = {}
    for peer in on_victim:
        new_homes.setdefault(peer.session_id, set()).add(peer.urls[-1])
    assert all(len(urls) == 1 for urls in new_homes.values()), new_homes

    async def withdrawn() -> bool:
        return victim_name not in await registry_view(fleet)

    await wait_until(withdrawn, "the stopped node's entry to go", WAIT_S)


async def test_a_dead_node_is_dropped_when_its_entry_expires(fleet: Fleet) -> None:
    """Runs after the SIGTERM test: node-1 is gone; this kills node-2 outright."""
    alive = [n for n in fleet.nodes if n.proc.poll() is None]
    assert len(alive) == 2
    dead, dead_name = fleet.nodes[2], "node-2"
    dead_url = fleet.url_of(dead)
    sids = [f"rd-{i}-{uuid.uuid4().hex[:8]}" for i in range(40)]
    async with unlimited_http() as http:
        swarm = Swarm(RoutedPeer(http, sid, role, f"{role}-{sid}",
                                 control_plane=fleet.control_plane, service_key=SERVICE_KEY,
                                 send_interval_s=0.5, retry_s=0.1, give_up_s=WAIT_S)
                      for sid in sids for role in ("host", "participant"))
        await swarm.start(CONCURRENCY)
        try:
            await swarm.wait_all(lambda p: p.received >= 1, "exchanging", WAIT_S)
            on_dead = [p for p in swarm.peers if p.urls[0] == dead_url]
            assert on_dead
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            await asyncio.to_thread(kill_node, dead)  # no drain, no withdraw: only the
            # TTL removes it; meanwhile the control plane still names it

            async def expired() -> bool:
                return dead_name not in await registry_view(fleet)

            await wait_until(expired, "the dead node's entry to expire", WAIT_S)
            expired_after = loop.time() - killed_at
            await swarm.wait_all(lambda p: p.connected and p.received_since_connect >= 2,
                                 "re-homed and exchanging", WAIT_S)
        finally:
            await swarm.stop()
    assert expired_after <= REGISTRY_TTL_S + 1.0, expired_after
    for peer in on_dead:
        assert peer.ended is None, describe(peer)
        assert peer.urls[-1] != dead_url, describe(peer)
        # Until the entry expired, the control plane still named the dead node: those
        # attempts failed fast (connection refused) and were retried.
        [reconnect] = peer.reconnects
        assert reconnect.succeeded, describe(peer)
        assert all("Connect" in a for a in reconnect.failed_attempts), describe(peer)
    assert any(p.reconnects[0].failed_attempts for p in on_dead)  # it was named a while
    assert all(p.connects == 1 for p in swarm.peers if p not in on_dead)
