"""The node registry on a real redis-server: listing, TTL expiry, withdraw, outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from rescue.cluster.redis_registry import RedisRegistry
from rescue.cluster.registry import (
    ACTIVE,
    NODES_KEY,
    RegistryUnavailable,
    WorkerRecord,
    encode_record,
    node_key,
    node_views,
)
from tests.support.redis import RedisServer

WAIT_S = 10.0
OUTAGE_CALL_LIMIT_S = 3.0


def rec(url: str = "ws://n/ws") -> bytes:
    return encode_record(WorkerRecord(url=url, state=ACTIVE, connections=1, sessions=1,
                                      generation=1, at=time.time()))


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[RedisRegistry]:
    reg = RedisRegistry(redis_server.url, timeout_s=0.5)
    yield reg
    await reg.close()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client: aioredis.Redis = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_publish_lists_the_node_and_sets_its_ttl(registry: RedisRegistry,
                                                       raw_redis: aioredis.Redis) -> None:
    fields = await registry.publish("n1", "w:1", rec(), ttl_s=7.0)
    assert set(fields) == {b"w:1"}
    fields = await registry.publish("n1", "w:2", rec(), ttl_s=7.0)
    assert set(fields) == {b"w:1", b"w:2"}  # the writer sees its siblings
    assert await raw_redis.smembers(NODES_KEY) == {b"n1"}
    ttl_ms = await raw_redis.pttl(node_key("n1"))
    assert 6000 < ttl_ms <= 7000
    read = await registry.read()
    assert set(read) == {"n1"} and set(read["n1"]) == {b"w:1", b"w:2"}
    assert [v.node_id for v in node_views(read, 7.0)] == ["n1"]


async def test_withdrawing_the_last_worker_unlists_the_node(registry: RedisRegistry,
                                                            raw_redis: aioredis.Redis) -> None:
    await registry.publish("n1", "w:1", rec(), ttl_s=7.0)
    await registry.publish("n1", "w:2", rec(), ttl_s=7.0)
    await registry.withdraw("n1", "w:1")
    assert set((await registry.read())["n1"]) == {b"w:2"}
    await registry.withdraw("n1", "w:2")
    assert await registry.read() == {}
    assert await raw_redis.smembers(NODES_KEY) == set()
    assert not await raw_redis.exists(node_key("n1"))


async def test_prune_deletes_named_fields(registry: RedisRegistry) -> None:
    await registry.publish("n1", "w:1", rec(), ttl_s=7.0)
    await registry.publish("n1", "w:2", rec(), ttl_s=7.0)
    await registry.prune("n1", ["w:1"])
    await registry.prune("n1", [])
    assert set((await registry.read())["n1"]) == {b"w:2"}


async def test_a_node_that_stops_refreshing_expires_and_is_unlisted(
        registry: RedisRegistry, raw_redis: aioredis.Redis) -> None:
    await registry.publish("dead", "w:1", rec(), ttl_s=0.2)
    await registry.publish("alive", "w:1", rec(), ttl_s=30.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while "dead" in await registry.read():
        assert loop.time() < deadline, "the dead node never expired"
        await asyncio.sleep(0.05)
    assert set(await registry.read()) == {"alive"}
    assert await raw_redis.smembers(NODES_KEY) == {b"alive"}  # the reader unlisted it


async def test_an_unreachable_redis_raises_registry_unavailable_quickly(
        registry: RedisRegistry, redis_server: RedisServer) -> None:
    await registry.publish("n1", "w:1", rec(), ttl_s=7.0)
    redis_server.kill()
    loop = asyncio.get_running_loop()
    for call in (registry.publish("n1", "w:1", rec(), ttl_s=7.0), registry.read(),
                 registry.withdraw("n1", "w:1"), registry.prune("n1", ["w:1"])):
        started = loop.time()
        with pytest.raises(RegistryUnavailable):
            await call
        assert loop.time() - started < OUTAGE_CALL_LIMIT_S
    redis_server.restart()  # empty, like a Redis that lost its data
    deadline = loop.time() + WAIT_S
    while True:  # the client reconnects by itself; the next heartbeat re-registers
        try:
            await registry.publish("n1", "w:1", rec(), ttl_s=7.0)
            break
        except RegistryUnavailable:
            assert loop.time() < deadline, "no recovery after the restart"
            await asyncio.sleep(0.05)
    assert set(await registry.read()) == {"n1"}
