"""Whole multi-node setups for one test: three nodes behind a real HAProxy, or three nodes
registered in a real Redis with a standalone control plane handing out their URLs.

Each is a context manager that starts everything (nodes in parallel) and stops what it
started, in reverse order, however the test ends. :class:`Cluster` also says which node
served a connection: a node logs ``hello.accepted`` with the ``connection_id`` it put in
its ``server_hello``, so a client's ``connected`` event names its node exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rescue.cluster.redis_registry import RedisRegistry
from rescue.cluster.registry import node_views
from rescue.keys import SigningKey
from tests.support.haproxy import HAProxy
from tests.support.nodes import ControlPlaneProcess, start_nodes
from tests.support.observe import wait_until
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess

START_WAIT_S = 20.0


@dataclass
class Cluster:
    """Running nodes (``node-<i>``) and what routes clients to them."""

    nodes: list[RelayProcess]
    haproxy: HAProxy | None = None
    redis: RedisServer | None = None
    control_plane: ControlPlaneProcess | None = None

    def node(self, name: str) -> RelayProcess:
        """The node called ``name``."""
        return self.nodes[int(name.rsplit("-", 1)[1])]

    def node_of_connection(self, connection_id: str) -> str | None:
        """The node whose log says it accepted the hello of ``connection_id``, if any yet."""
        for i, node in enumerate(self.nodes):
            if any(r.get("connection_id") == connection_id
                   for r in node.events("hello.accepted")):
                return f"node-{i}"
        return None

    async def wait_node_of(self, connection_id: str, within_s: float = 10.0) -> str:
        """:meth:`node_of_connection`, waiting for the node's log line to be read."""
        async def check() -> str | None:
            return self.node_of_connection(connection_id)

        name: str = await wait_until(check, f"the node of connection {connection_id}",
                                     within_s)
        return name

    async def registry_view(self, ttl_s: float) -> dict[str, str]:
        """Node id → state, as the registry holds them now."""
        assert self.redis is not None, "this cluster has no registry"
        registry = RedisRegistry(self.redis.url)
        try:
            return {v.node_id: v.state for v in node_views(await registry.read(), ttl_s)}
        finally:
            await registry.close()


@contextlib.contextmanager
def haproxy_cluster(haproxy_binary: str, count: int, key_dir: Path,
                    signing_key: SigningKey, base: Path, **settings: Any
                    ) -> Iterator[Cluster]:
    """``count`` nodes with ``settings`` behind one HAProxy (every server UP on entry)."""
    nodes = start_nodes(count, key_dir, signing_key, base, **settings)
    haproxy: HAProxy | None = None
    try:
        haproxy = HAProxy(haproxy_binary, [(f"node-{i}", n.port) for i, n in enumerate(nodes)],
                          signing_key)
        haproxy.start()
        yield Cluster(nodes, haproxy=haproxy)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def routed_cluster(redis_binary: str, count: int, key_dir: Path, signing_key: SigningKey,
                   base: Path, *, service_key: str, registry_ttl_s: float,
                   **settings: Any) -> Iterator[Cluster]:
    """A fresh Redis, ``count`` nodes registered in it (every one active on entry) and a
    standalone control plane that routes each token to the owner node; the nodes run no
    control plane of their own."""
    (base / "redis").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(redis_binary, base / "redis")
    redis.start()
    nodes: list[RelayProcess] = []
    control_plane: ControlPlaneProcess | None = None
    try:
        nodes = start_nodes(count, key_dir, signing_key, base, registry_redis_url=redis.url,
                            registry_ttl_s=registry_ttl_s, control_plane=False, **settings)
        control_plane = ControlPlaneProcess(
            base / "cp", redis_url=redis.url, registry_redis_url=redis.url,
            registry_ttl_s=registry_ttl_s, service_keys=service_key,
            signing_keys=str(key_dir), mint_rate_per_session_per_min=10000,
            mint_rate_per_service_key_per_s=10000, log_level="info")
        assert control_plane.listening["relay_routing"] == "registry"
        cluster = Cluster(nodes, redis=redis, control_plane=control_plane)
        everyone = {f"node-{i}": "active" for i in range(count)}

        async def registered() -> bool:
            return await cluster.registry_view(registry_ttl_s) == everyone

        asyncio.run(wait_until(registered, "every node registered", START_WAIT_S))
        yield cluster
    finally:
        if control_plane is not None:
            control_plane.stop()
        for node in nodes:
            node.stop()
        redis.stop()
