"""The control plane's view of the node registry, for choosing each token's ``relay_url``.

The registry is read afresh for every choice, so a node that marked itself draining is
never handed out again once its write is done; requests that arrive while a read is in
flight share it (one Redis round trip per burst, not per request). When the registry
cannot be read, the last view is used while it is younger than the TTL (nodes expire
from the registry on that scale anyway); past that the caller gets
:class:`~rescue.cluster.registry.RegistryUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from rescue.cluster.registry import (
    NodeView,
    Placement,
    Registry,
    RegistryUnavailable,
    node_views,
)
from rescue.logs import log_event

log = logging.getLogger("rescue.cluster")


class NodeDirectory:
    """Active nodes from the registry, and the owner of a session among them."""

    def __init__(self, registry: Registry, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.clock = clock
        self.placement: Placement | None = None
        self.views: list[NodeView] = []
        self.read_at = float("-inf")
        self.failures = 0
        self._inflight: asyncio.Future[Placement] | None = None

    async def _read(self) -> Placement:
        try:
            raw = await self.registry.read()
        except RegistryUnavailable as e:
            self.failures += 1
            if self.placement is not None and self.clock() - self.read_at < self.ttl_s:
                log_event(log, "registry.read_failed", level=logging.WARNING,
                          error=str(e), using_view_of_age_s=round(
                              self.clock() - self.read_at, 3))
                return self.placement
            raise
        self.views = node_views(raw, self.ttl_s)
        self.placement = Placement(self.views)
        self.read_at = self.clock()
        return self.placement

    async def current(self) -> Placement:
        """A placement over the nodes active now (one read shared by concurrent callers).

        Raises :class:`RegistryUnavailable` when the registry cannot be read and no
        recent view is left.
        """
        if self._inflight is None:
            future: asyncio.Future[Placement] = asyncio.ensure_future(self._read())
            self._inflight = future
            future.add_done_callback(self._clear)
        return await asyncio.shield(self._inflight)

    def _clear(self, future: asyncio.Future[Placement]) -> None:
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved: a failure is re-raised to every awaiter

    async def owner(self, session_id: str) -> NodeView | None:
        """The active node that owns ``session_id``; None if no node is active."""
        return (await self.current()).owner(session_id)

    async def close(self) -> None:
        """Release the registry's connections."""
        await self.registry.close()
