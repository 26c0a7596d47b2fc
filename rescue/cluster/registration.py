"""A worker's part in keeping its node registered: publish, refresh, leave, withdraw.

Every worker of a node writes its own record into the node's registry entry (see
:mod:`rescue.cluster.registry`) before it reports ready, and then every third of the
TTL, so the entry lives as long as any worker of the node does; during a reload the new
generation's records are there before the old generation is told to drain, so the node
never drops out of the active set. When the node stops, each
worker marks its record ``draining`` before it tells a peer to reconnect; on a clean
exit each worker deletes its record, and the entry disappears with the last one.

The registry must never take the relay down: every failure is caught, counted and
logged (once when it starts, then at most every :data:`LOG_EVERY_S`, and once when the
registry answers again); the relay keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from rescue import metrics
from rescue.cluster.redis_registry import RedisRegistry
from rescue.cluster.registry import (
    ACTIVE,
    DRAINING,
    Registry,
    RegistryUnavailable,
    State,
    WorkerRecord,
    encode_record,
    stale_fields,
    worker_field,
)
from rescue.config import Config
from rescue.logs import log_event

log = logging.getLogger("rescue.cluster")

LOG_EVERY_S = 30.0
Load = Callable[[], tuple[int, int]]
"""Returns the worker's ``(connections, sessions)`` now."""


class Registration:
    """One worker's record in its node's registry entry."""

    def __init__(self, registry: Registry, *, node_id: str, url: str, generation: int,
                 ttl_s: float, load: Load, pid: int | None = None, timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self.node_id = node_id
        self.url = url
        self.generation = generation
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.load = load
        self.field = worker_field(os.getpid() if pid is None else pid)
        self.clock = clock
        self.monotonic = monotonic
        self.state: State = ACTIVE
        self.published = 0
        self.failures = 0
        self.failing = False
        self._failures_logged = 0
        self._last_log = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def record(self) -> WorkerRecord:
        """This worker's record as of now."""
        connections, sessions = self.load()
        return WorkerRecord(url=self.url, state=self.state, connections=connections,
                            sessions=sessions, generation=self.generation, at=self.clock())

    async def publish(self) -> bool:
        """Write the record once (and delete stale records of dead siblings); True if the
        registry took it. Never raises for a registry failure."""
        record = self.record()
        try:
            async with asyncio.timeout(self.timeout_s):  # name resolution included
                fields = await self.registry.publish(self.node_id, self.field,
                                                     encode_record(record), self.ttl_s)
                stale = [f for f in stale_fields(fields, record.at, self.ttl_s)
                         if f != self.field]
                if stale:
                    await self.registry.prune(self.node_id, stale)
                    log_event(log, "registry.pruned", node_id=self.node_id, fields=stale)
        except (RegistryUnavailable, TimeoutError) as e:
            self._failed(str(e) or "timed out")
            return False
        self.published += 1
        if self.failing:
            self.failing = False
            log_event(log, "registry.recovered", node_id=self.node_id,
                      failures=self.failures)
        elif self.published == 1:
            log_event(log, "registry.registered", node_id=self.node_id, url=self.url,
                      state=self.state)
        return True

    def _failed(self, error: str) -> None:
        self.failures += 1
        metrics.REGISTRY_ERRORS.inc()
        now = self.monotonic()
        if not self.failing or now - self._last_log >= LOG_EVERY_S:
            log_event(log, "registry.publish_failed", level=logging.WARNING,
                      node_id=self.node_id, error=error, failures=self.failures,
                      detail="the node keeps serving; its registry entry may expire")
            self._last_log = now
        self.failing = True

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.publish()

    async def begin(self) -> bool:
        """Publish now, then every third of the TTL until :meth:`withdraw`; True if the
        first write was taken (a failure is retried at the next refresh)."""
        published = await self.publish()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        return published

    async def leave(self) -> bool:
        """Mark the record ``draining`` and publish it now; True if the registry took it."""
        self.state = DRAINING
        return await self.publish()

    async def withdraw(self) -> None:
        """Stop refreshing and delete the record (the last step of a clean exit)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.registry.withdraw(self.node_id, self.field)
        except (RegistryUnavailable, TimeoutError) as e:
            self._failed(str(e) or "timed out")
            return
        log_event(log, "registry.withdrawn", node_id=self.node_id)


def node_id_of(config: Config, port: int) -> str:
    """This node's registry name: ``node_id``, else ``<hostname>:<port>``."""
    return config.node_id or f"{socket.gethostname()}:{port}"


def node_url_of(config: Config, port: int) -> str:
    """This node's public WebSocket URL: ``node_url``, else ``ws://<host>:<port>/ws``."""
    return config.node_url or f"ws://{config.host}:{port}/ws"


def registration_for(config: Config, port: int, generation: int,
                     load: Load) -> Registration | None:
    """The worker's :class:`Registration` when ``registry_redis_url`` is set (call after
    fork, inside the worker's event loop), else None."""
    if not config.registry_redis_url:
        return None
    registry = RedisRegistry(config.registry_redis_url, timeout_s=config.redis_timeout_s)
    return Registration(registry, node_id=node_id_of(config, port),
                        url=node_url_of(config, port), generation=generation,
                        ttl_s=config.registry_ttl_s, load=load,
                        timeout_s=2 * config.redis_timeout_s)
