"""An in-memory node registry for the cluster tests, with a switch to make it fail."""

from __future__ import annotations

import pytest

from rescue.cluster.registry import RegistryUnavailable


class FakeRegistry:
    """A :class:`~rescue.cluster.registry.Registry` in a dict; ``down`` makes every call
    raise :class:`RegistryUnavailable`. Records calls for assertions."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[bytes, bytes]] = {}
        self.down = False
        self.calls: list[str] = []
        self.closed = False

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise RegistryUnavailable("fake registry is down")

    async def publish(self, node_id: str, field: str, record: bytes,
                      ttl_s: float) -> dict[bytes, bytes]:
        self._check("publish")
        self.nodes.setdefault(node_id, {})[field.encode()] = record
        return dict(self.nodes[node_id])

    async def prune(self, node_id: str, fields: list[str]) -> None:
        self._check("prune")
        for field in fields:
            self.nodes.get(node_id, {}).pop(field.encode(), None)

    async def withdraw(self, node_id: str, field: str) -> None:
        self._check("withdraw")
        node = self.nodes.get(node_id, {})
        node.pop(field.encode(), None)
        if not node:
            self.nodes.pop(node_id, None)

    async def read(self) -> dict[str, dict[bytes, bytes]]:
        self._check("read")
        return {k: dict(v) for k, v in self.nodes.items()}

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_registry() -> FakeRegistry:
    return FakeRegistry()
