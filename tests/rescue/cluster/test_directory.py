"""Tests for rescue.cluster.directory: the control plane's fresh view of the registry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rescue.cluster.directory import NodeDirectory
from rescue.cluster.registry import (
    ACTIVE,
    DRAINING,
    RegistryUnavailable,
    State,
    WorkerRecord,
    encode_record,
)
from rescue.ring import Ring

TTL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def register(registry: Any, node_id: str, state: State = ACTIVE) -> None:
    registry.nodes.setdefault(node_id, {})[b"w:1"] = encode_record(WorkerRecord(
        url=f"ws://{node_id}/ws", state=state, connections=0, sessions=0, generation=1,
        at=100.0))


async def test_owner_is_the_rendezvous_choice_among_active_nodes(fake_registry: Any) -> None:
    for node in ("a", "b", "c"):
        register(fake_registry, node)
    directory = NodeDirectory(fake_registry, TTL)
    ring = Ring(["a", "b", "c"])
    for i in range(50):
        owner = await directory.owner(f"s{i}")
        assert owner is not None
        assert owner.node_id == ring.owner(f"s{i}")
        assert owner.url == f"ws://{owner.node_id}/ws"


async def test_a_node_marked_draining_is_not_chosen_on_the_next_call(
        fake_registry: Any) -> None:
    for node in ("a", "b", "c"):
        register(fake_registry, node)
    directory = NodeDirectory(fake_registry, TTL)
    sids = [f"s{i}" for i in range(60)]
    on_b = [s for s in sids if (o := await directory.owner(s)) and o.node_id == "b"]
    assert on_b
    register(fake_registry, "b", DRAINING)
    for sid in on_b:
        owner = await directory.owner(sid)
        assert owner is not None and owner.node_id in ("a", "c")


async def test_no_active_node_means_no_owner(fake_registry: Any) -> None:
    directory = NodeDirectory(fake_registry, TTL)
    assert await directory.owner("s") is None
    register(fake_registry, "a", DRAINING)
    assert await directory.owner("s") is None


async def test_concurrent_callers_share_one_read(fake_registry: Any) -> None:
    register(fake_registry, "a")
    gate = asyncio.Event()
    real_read = fake_registry.read

    async def slow_read() -> Any:
        await gate.wait()
        return await real_read()

    fake_registry.read = slow_read
    directory = NodeDirectory(fake_registry, TTL)
    waiters = [asyncio.ensure_future(directory.owner(f"s{i}")) for i in range(20)]
    await asyncio.sleep(0)
    gate.set()
    owners = await asyncio.gather(*waiters)
    assert {o.node_id for o in owners if o is not None} == {"a"}
    assert fake_registry.calls.count("read") == 1
    await directory.owner("again")  # a later call reads afresh
    assert fake_registry.calls.count("read") == 2


async def test_an_unreadable_registry_falls_back_to_a_recent_view(fake_registry: Any) -> None:
    register(fake_registry, "a")
    clock = Clock()
    directory = NodeDirectory(fake_registry, TTL, clock=clock)
    first = await directory.owner("s")
    assert first is not None
    fake_registry.down = True
    clock.now = TTL - 0.1
    assert await directory.owner("s") == first
    clock.now = TTL + 0.1
    with pytest.raises(RegistryUnavailable):
        await directory.owner("s")
    assert directory.failures == 2


async def test_an_unreadable_registry_without_any_view_raises(fake_registry: Any) -> None:
    fake_registry.down = True
    directory = NodeDirectory(fake_registry, TTL)
    with pytest.raises(RegistryUnavailable):
        await directory.owner("s")
    fake_registry.down = False
    register(fake_registry, "a")
    owner = await directory.owner("s")
    assert owner is not None and owner.node_id == "a"
    await directory.close()
    assert fake_registry.closed
