"""The node registry (:class:`~rescue.cluster.registry.Registry`) in Redis.

Created after fork, in the process that uses it (redis-py's asyncio client does not
survive a fork), with short timeouts and no retries: a worker's heartbeat simply tries
again at its next tick, and a control plane falls back to its last view. Each write and
each read is one Lua script, so a node's listing and its hash never disagree (a node
re-registering cannot be unlisted by a reader that saw its key expire a moment before).
Scripts build node keys from a prefix, so the registry needs a standalone Redis (or a
single-slot deployment), as the guardrail store does.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rescue.cluster.registry import NODE_KEY_PREFIX, NODES_KEY, RegistryUnavailable, node_key

# KEYS[1]: node hash, KEYS[2]: node set; ARGV: field, record, ttl ms, node id.
_PUBLISH = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1]: node hash, KEYS[2]: node set; ARGV: field, node id.
_WITHDRAW = """
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS[1]: node set; ARGV[1]: node key prefix. Returns {id1, {f, v, ...}, id2, ...}.
_READ = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. id)
  if #fields == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    out[#out + 1] = id
    out[#out + 1] = fields
  end
end
return out
"""


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RedisRegistry:
    """Node records in Redis; every failure surfaces as :class:`RegistryUnavailable`."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 8) -> None:
        self.url = url
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=self._pool)
        self._publish: Any = self._redis.register_script(_PUBLISH)
        self._withdraw: Any = self._redis.register_script(_WITHDRAW)
        self._read: Any = self._redis.register_script(_READ)

    async def publish(self, node_id: str, field: str, record: bytes,
                      ttl_s: float) -> dict[bytes, bytes]:
        """Write ``field``, refresh the node's TTL and list it; return its fields."""
        try:
            flat = await self._publish(keys=[node_key(node_id), NODES_KEY],
                                       args=[field, record, int(ttl_s * 1000), node_id])
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {type(e).__name__}: {e}") from e
        return _pairs(flat)

    async def prune(self, node_id: str, fields: list[str]) -> None:
        """Delete ``fields`` of ``node_id`` (nothing to do for an empty list)."""
        if not fields:
            return
        try:
            await self._redis.hdel(node_key(node_id), *fields)
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def withdraw(self, node_id: str, field: str) -> None:
        """Delete ``field``; unlist the node when it was the last one."""
        try:
            await self._withdraw(keys=[node_key(node_id), NODES_KEY], args=[field, node_id])
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def read(self) -> dict[str, dict[bytes, bytes]]:
        """Every listed node's fields; nodes whose key expired are unlisted."""
        try:
            flat = await self._read(keys=[NODES_KEY], args=[NODE_KEY_PREFIX])
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis: {type(e).__name__}: {e}") from e
        out: dict[str, dict[bytes, bytes]] = {}
        for i in range(0, len(flat) - 1, 2):
            node_id = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
            out[node_id] = _pairs(flat[i + 1])
        return out

    async def close(self) -> None:
        """Release the connections."""
        await self._redis.aclose()
        await self._pool.disconnect()
