"""Control-plane routing: the token API's ``relay_url`` is the registry's active node that
owns the session (in-process API over an in-memory registry and store)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from rescue.cluster.directory import NodeDirectory
from rescue.cluster.registry import (
    ACTIVE,
    DRAINING,
    State,
    WorkerRecord,
    encode_record,
)
from rescue.config import Config
from rescue.controlplane.api import ControlPlane
from rescue.controlplane.guardrail import counter_keys
from rescue.controlplane.store import MemoryStore
from rescue.keys import load_signing_key
from rescue.ring import Ring

SERVICE_KEY = "routing-service-key"
NODES = ("node-a", "node-b", "node-c")


def register(registry: Any, node_id: str, state: State = ACTIVE) -> None:
    registry.nodes.setdefault(node_id, {})[b"w:1"] = encode_record(WorkerRecord(
        url=f"wss://{node_id}.example.net/ws", state=state, connections=0, sessions=0,
        generation=1, at=1.0))


class Api:
    """The token API in process, its store and its registry."""

    def __init__(self, client: TestClient[Any, Any], store: MemoryStore,
                 registry: Any) -> None:
        self.client, self.store, self.registry = client, store, registry

    async def token(self, session_id: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        resp = await self.client.post("/v1/fallback/token", json={"session_id": session_id},
                                      headers={"Authorization": f"Bearer {SERVICE_KEY}"})
        return resp.status, dict(resp.headers), await resp.json()


async def start(key_dir: Path, registry: Any | None) -> tuple[TestClient[Any, Any],
                                                                 MemoryStore]:
    config = Config(service_keys=SERVICE_KEY, signing_keys=str(key_dir),
                    relay_url="wss://static.example.net/ws", registry_redis_url="unused",
                    mint_rate_per_session_per_min=1000)
    store = MemoryStore()
    directory = NodeDirectory(registry, config.registry_ttl_s) if registry else None
    api = ControlPlane(config, store, load_signing_key(key_dir), None, directory=directory)
    app = web.Application()
    api.add_routes(app)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client, store


@pytest.fixture
async def api(key_dir: Path, fake_registry: Any) -> AsyncIterator[Api]:
    client, store = await start(key_dir, fake_registry)
    yield Api(client, store, fake_registry)
    await client.close()


async def test_relay_url_is_the_owner_node_and_the_same_for_both_peers(api: Api) -> None:
    for node in NODES:
        register(api.registry, node)
    ring = Ring(sorted(NODES))
    seen = set()
    for i in range(30):
        sid = f"route-{i}"
        host = await api.token(sid)
        participant = await api.token(sid)
        assert host[0] == participant[0] == 200
        assert host[2]["relay_url"] == participant[2]["relay_url"] \
            == f"wss://{ring.owner(sid)}.example.net/ws"
        seen.add(host[2]["relay_url"])
    assert len(seen) == 3  # every node gets sessions


async def test_a_draining_node_gets_no_more_sessions(api: Api) -> None:
    for node in NODES:
        register(api.registry, node)
    sids = [f"drain-{i}" for i in range(40)]
    owners = {sid: (await api.token(sid))[2]["relay_url"] for sid in sids}
    register(api.registry, "node-b", DRAINING)
    for sid, before in owners.items():
        status, _, body = await api.token(sid)
        assert status == 200
        assert "node-b" not in body["relay_url"]
        if "node-b" not in before:
            assert body["relay_url"] == before  # only node-b's sessions moved


async def test_no_active_node_is_503_store_unavailable_and_nothing_is_counted(
        api: Api) -> None:
    register(api.registry, "node-a", DRAINING)
    before = time.time()
    status, headers, body = await api.token("lonely")
    assert (status, body["error"]) == (503, "store_unavailable")
    assert headers["Retry-After"] == "5"
    assert "no relay node" in body["detail"]
    for at in (before, time.time()):  # the hour of the request, even across a boundary
        assert api.store.ttl(counter_keys("public", at)[0]) is None  # nothing counted
    register(api.registry, "node-b")
    assert (await api.token("lonely"))[0] == 200  # ... and the check can fail:
    assert api.store.ttl(counter_keys("public", time.time())[0]) is not None


async def test_an_unreachable_registry_is_503(api: Api) -> None:
    api.registry.down = True
    status, _, body = await api.token("s")
    assert (status, body["error"]) == (503, "store_unavailable")


async def test_without_a_registry_the_configured_relay_url_is_returned(
        key_dir: Path) -> None:
    client, _ = await start(key_dir, None)
    try:
        resp = await client.post("/v1/fallback/token", json={"session_id": "s"},
                                 headers={"Authorization": f"Bearer {SERVICE_KEY}"})
        assert resp.status == 200
        assert (await resp.json())["relay_url"] == "wss://static.example.net/ws"
    finally:
        await client.close()
