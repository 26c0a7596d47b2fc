"""The store contract, run against MemoryStore and against RedisStore on a real redis-server.

Both stores must count exactly (no lost increment under concurrency), set each counter's
TTL on its first increment and never extend it, keep cohort-hours apart, and hold the
kill switch. The Redis store must also turn an unreachable server into
:class:`StoreUnavailable` quickly and recover by itself when the server is back.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis

from rescue.controlplane.guardrail import COUNTER_TTL_S, KEY_PREFIX, counter_keys
from rescue.controlplane.redis_store import PAUSE_KEY, RedisStore
from rescue.controlplane.store import MemoryStore, Pause, Store, StoreUnavailable
from tests.support.observe import free_port
from tests.support.redis import RedisServer

NOW = calendar.timegm((2025, 6, 1, 10, 30, 0, 0, 0, 0))  # 10:30 UTC
TTL_SLACK_S = 5.0  # a Redis TTL is read some milliseconds after it was set
OUTAGE_CALL_LIMIT_S = 3.0
RECOVERY_TIMEOUT_S = 10.0


class Harness(Protocol):
    """A store under test plus the means to look at and age its counters."""

    store: Store

    async def ttl(self, key: str) -> float | None: ...

    async def elapse(self, seconds: float) -> None: ...

    async def close(self) -> None: ...


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class MemoryHarness:
    """MemoryStore over a fake clock: elapsing time is moving the clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.memory = MemoryStore(clock=self.clock)
        self.store: Store = self.memory

    async def ttl(self, key: str) -> float | None:
        return self.memory.ttl(key)

    async def elapse(self, seconds: float) -> None:
        self.clock.t += seconds

    async def close(self) -> None:
        await self.store.close()


class RedisHarness:
    """RedisStore on a real server: elapsing time is shortening every key's TTL."""

    def __init__(self, url: str) -> None:
        self.redis_store = RedisStore(url, timeout_s=0.5)
        self.store: Store = self.redis_store
        self.raw = aioredis.Redis.from_url(url, socket_timeout=2.0)

    async def ttl(self, key: str) -> float | None:
        millis = await self.raw.pttl(key)
        return millis / 1000 if millis >= 0 else None

    async def elapse(self, seconds: float) -> None:
        async for key in self.raw.scan_iter(match=f"{KEY_PREFIX}:*"):
            remaining = await self.raw.pttl(key)
            if remaining < 0:
                continue
            left = remaining - int(seconds * 1000)
            if left <= 0:
                await self.raw.delete(key)
            else:
                await self.raw.pexpire(key, left)

    async def close(self) -> None:
        await self.store.close()
        await self.raw.aclose()


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h: Harness
    if request.param == "memory":
        h = MemoryHarness()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        h = RedisHarness(server.url)
    yield h
    await h.close()


# --- the contract -----------------------------------------------------------------------


async def test_counts_fallbacks_against_the_hours_sessions(harness: Harness) -> None:
    store = harness.store
    assert [await store.count_session("public", NOW) for _ in range(3)] == [1, 2, 3]
    assert await store.count_fallback("public", NOW) == (1, 3)
    assert await store.count_fallback("public", NOW) == (2, 3)
    assert await store.count_session("public", NOW) == 4
    assert await store.count_fallback("public", NOW) == (3, 4)


async def test_fallback_with_no_session_reports_zero_sessions(harness: Harness) -> None:
    assert await harness.store.count_fallback("public", NOW) == (1, 0)
    # Reading the session counter does not create it.
    assert await harness.ttl(counter_keys("public", NOW)[1]) is None


async def test_ttl_is_set_on_the_first_increment(harness: Harness) -> None:
    fallback_key, total_key = counter_keys("public", NOW)
    assert await harness.ttl(total_key) is None
    await harness.store.count_session("public", NOW)
    ttl = await harness.ttl(total_key)
    assert ttl is not None
    assert COUNTER_TTL_S - TTL_SLACK_S <= ttl <= COUNTER_TTL_S <= 5400
    assert await harness.ttl(fallback_key) is None
    await harness.store.count_fallback("public", NOW)
    ttl = await harness.ttl(fallback_key)
    assert ttl is not None
    assert COUNTER_TTL_S - TTL_SLACK_S <= ttl <= COUNTER_TTL_S


async def test_later_increments_keep_the_first_ttl(harness: Harness) -> None:
    fallback_key, total_key = counter_keys("public", NOW)
    await harness.store.count_session("public", NOW)
    await harness.store.count_fallback("public", NOW)
    await harness.elapse(1000)
    assert await harness.store.count_session("public", NOW) == 2
    assert await harness.store.count_fallback("public", NOW) == (2, 2)
    for key in (fallback_key, total_key):
        ttl = await harness.ttl(key)
        assert ttl is not None
        assert ttl <= COUNTER_TTL_S - 1000, (key, ttl)


async def test_counters_expire_after_their_ttl(harness: Harness) -> None:
    for _ in range(3):
        await harness.store.count_session("public", NOW)
    await harness.store.count_fallback("public", NOW)
    await harness.elapse(COUNTER_TTL_S + 1)
    assert await harness.store.count_fallback("public", NOW) == (1, 0)
    assert await harness.store.count_session("public", NOW) == 1
    ttl = await harness.ttl(counter_keys("public", NOW)[1])
    assert ttl is not None
    assert ttl >= COUNTER_TTL_S - TTL_SLACK_S  # a fresh counter, a fresh TTL


async def test_hour_boundary_starts_new_counters(harness: Harness) -> None:
    store = harness.store
    last_moment = calendar.timegm((2025, 6, 1, 10, 59, 59, 0, 0, 0)) + 0.999
    next_hour = calendar.timegm((2025, 6, 1, 11, 0, 0, 0, 0, 0))
    assert await store.count_session("public", last_moment) == 1
    assert await store.count_session("public", last_moment) == 2
    assert await store.count_fallback("public", next_hour) == (1, 0)
    assert await store.count_session("public", next_hour) == 1
    assert await store.count_fallback("public", last_moment) == (1, 2)
    assert await store.count_fallback("public", next_hour) == (2, 1)


async def test_cohorts_are_counted_apart(harness: Harness) -> None:
    store = harness.store
    await store.count_session("public", NOW)
    await store.count_session("beta", NOW)
    await store.count_session("beta", NOW)
    assert await store.count_fallback("beta", NOW) == (1, 2)
    assert await store.count_fallback("public", NOW) == (1, 1)
    assert await store.count_fallback("gamma", NOW) == (1, 0)


async def test_pause_states_round_trip(harness: Harness) -> None:
    store = harness.store
    assert await store.pause_state() is Pause.OFF
    for state in (Pause.SOFT, Pause.HARD, Pause.SOFT, Pause.OFF, Pause.HARD, Pause.OFF):
        await store.set_pause(state)
        assert await store.pause_state() is state


async def test_concurrent_counting_loses_no_increment(harness: Harness) -> None:
    """300 calls in flight at once (more than a Redis pool holds): all counted, none lost."""
    store = harness.store
    fallbacks = [store.count_fallback("public", NOW) for _ in range(200)]
    sessions = [store.count_session("public", NOW) for _ in range(100)]
    results: list[Any] = await asyncio.gather(*fallbacks, *sessions)
    fallback_results: list[tuple[int, int]] = results[:200]
    session_results: list[int] = results[200:]
    # Every increment saw a distinct value: none was lost and none counted twice.
    assert sorted(f for f, _ in fallback_results) == list(range(1, 201))
    assert sorted(session_results) == list(range(1, 101))
    assert all(0 <= total <= 100 for _, total in fallback_results)
    assert await store.count_fallback("public", NOW) == (201, 100)
    for key in counter_keys("public", NOW):
        assert await harness.ttl(key) is not None  # no counter lives without a TTL


# --- Redis only -------------------------------------------------------------------------


async def test_redis_stores_share_counters_and_the_kill_switch(
        redis_server: RedisServer) -> None:
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        await first.count_session("public", NOW)
        assert await second.count_fallback("public", NOW) == (1, 1)
        assert await first.count_fallback("public", NOW) == (2, 1)
        await first.set_pause(Pause.HARD)
        assert await second.pause_state() is Pause.HARD
        await second.set_pause(Pause.OFF)
        assert await first.pause_state() is Pause.OFF
    finally:
        await first.close()
        await second.close()


async def test_redis_counts_exactly_across_concurrent_clients(
        redis_server: RedisServer) -> None:
    """Four clients (as four workers would), 50 calls in flight each: the Lua script is atomic."""
    stores = [RedisStore(redis_server.url) for _ in range(4)]
    try:
        calls: list[Coroutine[Any, Any, Any]] = [
            store.count_fallback("public", NOW) for store in stores for _ in range(50)]
        calls += [store.count_session("public", NOW) for store in stores for _ in range(25)]
        results: list[Any] = await asyncio.gather(*calls)
        assert sorted(f for f, _ in results[:200]) == list(range(1, 201))
        assert sorted(results[200:]) == list(range(1, 101))
        assert await stores[0].count_fallback("public", NOW) == (201, 100)
        for key in counter_keys("public", NOW):
            assert await stores[1].ttl(key) is not None
    finally:
        for store in stores:
            await store.close()


async def test_redis_unreadable_kill_switch_counts_as_paused(
        redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.set(PAUSE_KEY, "maybe")
        assert await store.pause_state() is Pause.SOFT
        await store.set_pause(Pause.OFF)
        assert await raw.exists(PAUSE_KEY) == 0
        assert await store.pause_state() is Pause.OFF
    finally:
        await store.close()
        await raw.aclose()


async def _assert_unavailable_quickly(call: Any) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(call, OUTAGE_CALL_LIMIT_S * 2)
    assert time.monotonic() - started < OUTAGE_CALL_LIMIT_S


async def test_redis_outage_raises_store_unavailable_and_recovers_on_restart(
        redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout_s=0.3)
    try:
        await store.count_session("public", NOW)
        assert await store.count_fallback("public", NOW) == (1, 1)
        await store.set_pause(Pause.SOFT)
        assert await store.pause_state() is Pause.SOFT

        redis_server.kill()
        await _assert_unavailable_quickly(store.count_fallback("public", NOW))
        await _assert_unavailable_quickly(store.count_session("public", NOW))
        await _assert_unavailable_quickly(store.pause_state())
        await _assert_unavailable_quickly(store.set_pause(Pause.OFF))

        redis_server.restart()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_TIMEOUT_S
        while True:  # the same client reconnects by itself
            try:
                total = await store.count_session("public", NOW)
                break
            except StoreUnavailable:
                assert loop.time() < deadline, "RedisStore did not recover after restart"
                await asyncio.sleep(0.05)
        # The restarted server kept nothing: counting and the switch start over.
        assert total == 1
        assert await store.count_fallback("public", NOW) == (1, 1)
        assert await store.pause_state() is Pause.OFF
    finally:
        await store.close()


async def test_redis_never_reachable_is_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
    try:
        await _assert_unavailable_quickly(store.count_fallback("public", NOW))
        await _assert_unavailable_quickly(store.pause_state())
    finally:
        await store.close()


# --- memory only ------------------------------------------------------------------------


def test_memory_ttl_of_an_unknown_key_is_none() -> None:
    assert MemoryStore().ttl(counter_keys("public", NOW)[0]) is None


async def test_a_memory_store_keeps_its_kill_switch_in_its_pause_file(tmp_path: Path) -> None:
    path = tmp_path / "fallback-pause"
    first = MemoryStore(pause_file=path)
    assert await first.pause_state() is Pause.OFF
    await first.set_pause(Pause.HARD)
    assert await MemoryStore(pause_file=path).pause_state() is Pause.HARD  # a new process
    await first.set_pause(Pause.OFF)
    assert await MemoryStore(pause_file=path).pause_state() is Pause.OFF
    path.write_text("garbage\n")
    assert await MemoryStore(pause_file=path).pause_state() is Pause.OFF
