"""Tests for rescue.cluster.registration: a worker's record, its refresh, leave and withdraw,
and that a failing registry never raises into the relay."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from rescue.cluster.registration import (
    Registration,
    node_id_of,
    node_url_of,
    registration_for,
)
from rescue.cluster.registry import (
    ACTIVE,
    DRAINING,
    WorkerRecord,
    decode_record,
    encode_record,
    node_view,
)
from rescue.config import Config

WAIT_S = 5.0


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(registry: Any, *, pid: int = 11, ttl_s: float = 9.0, load: tuple[int, int] = (4, 2),
         clock: Clock | None = None, monotonic: Clock | None = None) -> Registration:
    return Registration(registry, node_id="node-a", url="ws://a:1/ws", generation=3,
                        ttl_s=ttl_s, load=lambda: load, pid=pid, clock=clock or Clock(),
                        monotonic=monotonic or Clock())


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


async def test_publish_writes_this_workers_record_with_its_load(fake_registry: Any) -> None:
    reg = make(fake_registry)
    assert await reg.publish()
    raw = fake_registry.nodes["node-a"][b"w:11"]
    assert decode_record(raw) == WorkerRecord(url="ws://a:1/ws", state=ACTIVE, connections=4,
                                              sessions=2, generation=3, at=1000.0)
    assert reg.interval_s == 3.0  # a third of the TTL


async def test_leave_marks_the_record_draining_at_once(fake_registry: Any) -> None:
    reg = make(fake_registry)
    await reg.publish()
    assert await reg.leave()
    record = decode_record(fake_registry.nodes["node-a"][b"w:11"])
    assert record is not None and record.state == DRAINING
    view = node_view("node-a", fake_registry.nodes["node-a"], 9.0)
    assert view is not None and not view.active


async def test_withdraw_deletes_only_this_workers_record(fake_registry: Any) -> None:
    one, two = make(fake_registry, pid=1), make(fake_registry, pid=2)
    await one.publish()
    await two.publish()
    await one.withdraw()
    assert set(fake_registry.nodes["node-a"]) == {b"w:2"}
    await two.withdraw()
    assert "node-a" not in fake_registry.nodes


async def test_publish_prunes_records_of_dead_siblings(fake_registry: Any) -> None:
    clock = Clock(1000.0)
    fake_registry.nodes["node-a"] = {
        b"w:99": encode_record(WorkerRecord(url="u", state=ACTIVE, connections=0,
                                            sessions=0, generation=1, at=980.0)),
        b"w:98": encode_record(WorkerRecord(url="u", state=ACTIVE, connections=0,
                                            sessions=0, generation=1, at=995.0)),
        b"w:97": b"not a record"}
    reg = make(fake_registry, clock=clock)
    assert await reg.publish()
    assert set(fake_registry.nodes["node-a"]) == {b"w:11", b"w:98"}


async def test_a_failing_registry_is_counted_and_logged_once_not_raised(
        fake_registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rescue.cluster")
    monotonic = Clock(0.0)
    reg = make(fake_registry, monotonic=monotonic)
    fake_registry.down = True
    for _ in range(5):
        assert not await reg.publish()
        monotonic.now += 1.0
    assert not await reg.leave()
    await reg.withdraw()  # no exception either
    assert reg.failures == 7 and reg.failing
    assert len(events(caplog, "registry.publish_failed")) == 1
    monotonic.now += 60.0  # a long outage is reminded of, not repeated per tick
    assert not await reg.publish()
    assert len(events(caplog, "registry.publish_failed")) == 2
    fake_registry.down = False
    assert await reg.publish()
    assert not reg.failing
    [recovered] = events(caplog, "registry.recovered")
    assert recovered.fields == {"node_id": "node-a", "failures": 8}  # type: ignore[attr-defined]


async def test_a_hanging_registry_is_given_up_after_the_timeout(fake_registry: Any) -> None:
    never = asyncio.Event()

    async def hang(*args: Any) -> dict[bytes, bytes]:
        await never.wait()
        return {}

    fake_registry.publish = hang
    reg = Registration(fake_registry, node_id="n", url="u", generation=1, ttl_s=9.0,
                       load=lambda: (0, 0), timeout_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await reg.publish()
    assert loop.time() - started < WAIT_S
    assert reg.failures == 1 and reg.failing


async def test_begin_publishes_at_once_then_refreshes_until_withdrawn(
        fake_registry: Any) -> None:
    reg = make(fake_registry, ttl_s=0.03)  # refresh every 10 ms
    assert await reg.begin()
    assert reg.published == 1 and b"w:11" in fake_registry.nodes["node-a"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while reg.published < 3:
        assert loop.time() < deadline, "no refresh within the wait"
        await asyncio.sleep(0.01)
    await reg.withdraw()
    published = reg.published
    assert "node-a" not in fake_registry.nodes
    await asyncio.sleep(0.05)  # several intervals: nothing writes any more
    assert reg.published == published
    assert fake_registry.calls[-1] == "withdraw"


def test_node_identity_defaults_from_host_and_port() -> None:
    config = Config(host="10.0.0.5")
    assert node_id_of(config, 9443).endswith(":9443")
    assert node_url_of(config, 9443) == "ws://10.0.0.5:9443/ws"
    named = Config(node_id="relay-3", node_url="wss://relay-3.example.net/ws")
    assert node_id_of(named, 1) == "relay-3"
    assert node_url_of(named, 1) == "wss://relay-3.example.net/ws"


async def test_no_registration_without_a_registry_url() -> None:
    assert registration_for(Config(), 9443, 1, lambda: (0, 0)) is None
    reg = registration_for(Config(registry_redis_url="redis://127.0.0.1:1/0",
                                  registry_ttl_s=6.0), 9443, 2, lambda: (0, 0))
    assert reg is not None and reg.ttl_s == 6.0 and reg.generation == 2
    await reg.registry.close()
