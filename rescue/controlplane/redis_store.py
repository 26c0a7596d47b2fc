"""The control plane's :class:`~rescue.controlplane.store.Store` in Redis.

Created inside each worker after fork (redis-py's asyncio client does not survive a
fork), with explicit timeouts and a short exponential-backoff retry. Counting is one
Lua script per call (increment, set the TTL when missing, read the other counter), so
concurrent requests never lose an increment and a counter never lives without a TTL.
Any Redis failure surfaces as :class:`StoreUnavailable`; the client reconnects by itself
on the next call once Redis is back.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from rescue.controlplane.guardrail import COUNTER_TTL_S, KEY_PREFIX, counter_keys
from rescue.controlplane.store import Pause, StoreUnavailable

PAUSE_KEY = f"{KEY_PREFIX}:fallback_ws_paused"

# KEYS[1]: counter to increment, KEYS[2]: counter to read (optional); ARGV[1]: TTL.
_COUNT = """
local v = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local other = 0
if KEYS[2] then other = tonumber(redis.call('GET', KEYS[2]) or '0') end
return {v, other}
"""


class RedisStore:
    """Guardrail counters and the kill switch in Redis."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, retries: int = 2,
                 max_connections: int = 64) -> None:
        self.url = url
        # A blocking pool queues commands past its size (up to timeout_s) instead of
        # failing them at once: a burst of token requests must not look like an outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=timeout_s, base=0.01), retries),
            retry_on_timeout=True, health_check_interval=10)
        self._pool = pool
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._count: Any = self._redis.register_script(_COUNT)

    async def _run(self, keys: list[str]) -> tuple[int, int]:
        try:
            first, other = await self._count(keys=keys, args=[COUNTER_TTL_S])
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        return int(first), int(other)

    async def count_fallback(self, cohort: str, now: float) -> tuple[int, int]:
        fallback_key, total_key = counter_keys(cohort, now)
        return await self._run([fallback_key, total_key])

    async def count_session(self, cohort: str, now: float) -> int:
        return (await self._run([counter_keys(cohort, now)[1]]))[0]

    async def pause_state(self) -> Pause:
        try:
            raw = await self._redis.get(PAUSE_KEY)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        if raw is None:
            return Pause.OFF
        try:
            return Pause(raw.decode() if isinstance(raw, bytes) else raw)
        except (ValueError, UnicodeDecodeError):
            return Pause.SOFT  # an unreadable switch errs on the side of stopping

    async def set_pause(self, pause: Pause) -> None:
        try:
            if pause is Pause.OFF:
                await self._redis.delete(PAUSE_KEY)
            else:
                await self._redis.set(PAUSE_KEY, pause.value)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it is not set (for tests and stats)."""
        try:
            value = await self._redis.ttl(key)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return float(value) if value is not None and value >= 0 else None

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()
