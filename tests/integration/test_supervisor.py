"""The supervisor as an operator meets it: worker processes and their slots, restarts of
crashed and stuck workers, a boot loop that gives up, drain on SIGTERM, fast stop on a
second TERM or INT, and TTIN/TTOU resizing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from rescue.keys import SigningKey
from rescue.ring import Ring
from tests.support.client import Closed, join, messages_until_close
from tests.support.observe import admin_stats, free_port, wait_for_exit, wait_until
from tests.support.processes import pid_gone, wait_for_workers
from tests.support.reconnecting import ReconnectingPeer, Swarm, describe, unlimited_http
from tests.support.relay import RelayProcess, start_relay

ADMIN_KEY = "supervisor-admin-key"
FAST: dict[str, Any] = {
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 10.0,
    "drain_window_s": 1.0,
    "drain_reconnect_spread_ms": 200,
}
WAIT_S = 15.0
IO_TIMEOUT_S = 10.0


# --- waiting for the node -------------------------------------------------------------------


async def holds(predicate: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    """Wait until ``predicate()`` is true (polled), or fail after ``within_s``."""

    async def check() -> bool:
        return predicate()

    await wait_until(check, what, within_s)


async def log_event(relay: RelayProcess, name: str, within_s: float = WAIT_S
                    ) -> dict[str, Any]:
    """Wait (off the event loop) for the next log record named ``name``."""
    return await asyncio.to_thread(relay.wait_for_event, name, within_s)


def sessions_per_slot(slots: int, per_slot: int, prefix: str) -> dict[int, list[str]]:
    """``per_slot`` fresh session ids owned by each slot of a ``slots``-worker node."""
    ring = Ring(range(slots))
    out: dict[int, list[str]] = {s: [] for s in range(slots)}
    while any(len(v) < per_slot for v in out.values()):
        sid = f"{prefix}-{uuid.uuid4().hex[:10]}"
        owner = ring.owner(sid)
        if len(out[owner]) < per_slot:
            out[owner].append(sid)
    return out


async def assert_pair_exchanges(http: aiohttp.ClientSession, relay: RelayProcess,
                                sid: str) -> None:
    """A fresh host and participant of ``sid`` meet and exchange a frame each way."""
    host = await join(http, relay, sid, "host", "h")
    part = await join(http, relay, sid, "participant", "p")
    try:
        await host.send_frame(b"ping")
        assert (await part.recv_frame()).payload == b"ping"
        await part.send_frame(b"pong")
        assert (await host.recv_frame()).payload == b"pong"
    finally:
        await part.close()
        await host.close()


# --- process titles and the slot table -----------------------------------------------------


async def test_workers_have_slot_titles_and_appear_in_the_slot_table(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(workers=3, admin_port=free_port(),
                                        admin_key=ADMIN_KEY, **FAST)
    by_slot = await wait_for_workers(relay, 3, generation=1)
    assert len(psutil.Process(relay.proc.pid).children()) == 3
    assert " ".join(p for p in psutil.Process(relay.proc.pid).cmdline() if p) == \
        "beach-rescue supervisor"

    async def table_complete() -> list[dict[str, Any]] | None:
        workers = (await admin_stats(http, relay, ADMIN_KEY))["workers"]
        done = (sorted(w["slot"] for w in workers) == [0, 1, 2]
                and all(w["state"] == "serving" and "connections" in w for w in workers))
        return workers if done else None

    table = await wait_until(table_complete, "every worker in the slot table", WAIT_S)
    assert {w["slot"]: w["pid"] for w in table} == by_slot
    assert {w["generation"] for w in table} == {1}


# --- a crashed worker ------------------------------------------------------------------------


async def test_killed_worker_is_restarted_and_only_its_peers_reconnect(
        relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=2, **FAST)
    by_slot = await wait_for_workers(relay, 2, generation=1)
    victim_slot = 0
    sids = sessions_per_slot(2, 4, "crash")
    async with unlimited_http() as http:
        peers = {slot: [ReconnectingPeer(http, relay, sid, role, f"{role}-{sid}",
                                         send_interval_s=0.05)
                        for sid in slot_sids for role in ("host", "participant")]
                 for slot, slot_sids in sids.items()}
        swarm = Swarm(p for group in peers.values() for p in group)
        await swarm.start()
        try:
            await swarm.wait_all(lambda p: p.received >= 3, "exchanging", WAIT_S)
            marks = swarm.marks()

            os.kill(by_slot[victim_slot], signal.SIGKILL)
            exited = await log_event(relay, "worker.exited")
            assert (exited["slot"], exited["worker_pid"], exited["asked"]) == \
                (victim_slot, by_slot[victim_slot], False), exited
            assert exited["exit_code"] == -signal.SIGKILL, exited
            restarted = await wait_for_workers(relay, 2, generation=1)
            assert restarted[victim_slot] != by_slot[victim_slot]
            assert restarted[1 - victim_slot] == by_slot[1 - victim_slot]

            victims, others = Swarm(peers[victim_slot]), Swarm(peers[1 - victim_slot])
            await victims.wait_all(lambda p: p.connects == 2 and p.received_since_connect >= 3,
                                   "back and exchanging on the restarted worker", WAIT_S)
            await others.wait_all(lambda p: p.received >= marks[p] + 20,
                                  "still exchanging", WAIT_S)
        finally:
            await swarm.stop()
    for peer in peers[victim_slot]:
        assert [r.cause.startswith("dropped") and r.succeeded for r in peer.reconnects] == \
            [True], describe(peer)
    for peer in peers[1 - victim_slot]:
        assert (peer.connects, peer.reconnects, peer.closes) == (1, [], []), describe(peer)


# --- a worker that cannot boot ----------------------------------------------------------------


@pytest.fixture
def own_key_dir(key_dir: Path, tmp_path: Path) -> Path:
    """A copy of the test keys that a test may break."""
    copy = tmp_path / "keys"
    shutil.copytree(key_dir, copy)
    return copy


@pytest.fixture
def own_relays() -> Iterator[list[RelayProcess]]:
    """Relays started by the test itself; stopped at teardown."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.stop(signal.SIGKILL)


async def test_worker_that_cannot_boot_makes_the_supervisor_exit_3(
        own_key_dir: Path, signing_key: SigningKey, tmp_path: Path,
        own_relays: list[RelayProcess]) -> None:
    relay = start_relay(own_key_dir, signing_key, tmp_path / "state", workers=2, **FAST)
    own_relays.append(relay)
    by_slot = await wait_for_workers(relay, 2, generation=1)
    for pub in await asyncio.to_thread(lambda: list(own_key_dir.glob("*.pub"))):
        pub.unlink()  # every new worker now fails in load_verifier
    os.kill(by_slot[1], signal.SIGKILL)

    status = await wait_for_exit(relay, 20.0)
    relay.stop()  # collects the rest of the log
    assert status == 3, relay.lines[-10:]
    [boot_loop] = relay.events("supervisor.boot_loop")
    assert boot_loop["level"] == "critical", boot_loop
    assert "slot 1" in boot_loop["detail"] and "failed" in boot_loop["detail"], boot_loop
    crashes = relay.events("worker.crashed")
    assert len(crashes) >= 2, relay.lines[-20:]
    for crash in crashes:  # each failed boot says what failed
        assert "KeyStoreError" in crash["exc"] and "public key" in crash["exc"], crash
    assert relay.events("supervisor.exited")[-1]["status"] == 3
    assert all(pid_gone(pid) for pid in by_slot.values())


# --- a stuck worker ----------------------------------------------------------------------------


async def test_stuck_worker_is_killed_and_replaced(relay_factory: Any,
                                                   http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(workers=2, worker_liveness_timeout_s=2, **FAST)
    by_slot = await wait_for_workers(relay, 2, generation=1)
    stuck_slot = 1
    loop = asyncio.get_running_loop()
    os.kill(by_slot[stuck_slot], signal.SIGSTOP)
    stopped_at = loop.time()
    try:
        stuck = await log_event(relay, "worker.stuck", within_s=10.0)
        assert (stuck["slot"], stuck["worker_pid"]) == (stuck_slot, by_slot[stuck_slot]), stuck
        assert stuck["silent_s"] >= 2, stuck  # rounded to 0.1 s
        assert loop.time() - stopped_at > 1.0  # not killed before it could have been silent
        # The SIGKILLed process may still be listed until it is reaped: wait for that.
        await holds(lambda: pid_gone(by_slot[stuck_slot]), "the stuck worker to be gone")
        replaced = await wait_for_workers(relay, 2, generation=1)
        assert replaced[stuck_slot] != by_slot[stuck_slot]
        assert replaced[1 - stuck_slot] == by_slot[1 - stuck_slot]
        # The replacement serves the slot's sessions.
        sid = sessions_per_slot(2, 1, "stuck")[stuck_slot][0]
        await assert_pair_exchanges(http, relay, sid)
    finally:
        if not pid_gone(by_slot[stuck_slot]):
            os.kill(by_slot[stuck_slot], signal.SIGCONT)


# --- SIGTERM: drain and exit 0 ---------------------------------------------------------------


class KeptAlive:
    """A raw kept-alive HTTP/1.1 connection for repeated ``GET``s."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> KeptAlive:
        """Connect to 127.0.0.1:``port``."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, target: str) -> tuple[int, dict[str, Any]]:
        """``GET target``; return (status, JSON body). Raises ConnectionError when closed."""
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        try:
            await self.writer.drain()
            async with asyncio.timeout(IO_TIMEOUT_S):
                head = await self.reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise ConnectionError("closed") from e
        return int(head.split(b" ")[1]), json.loads(body)

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()


async def readyz_until_gone(conn: KeptAlive) -> list[int]:
    """Poll ``/readyz`` on a kept-alive connection until the worker closes it."""
    statuses: list[int] = []
    while True:
        try:
            status, body = await conn.get("/readyz")
        except ConnectionError:
            return statuses
        assert (status, body["status"]) in ((200, "ok"), (503, "draining")), (status, body)
        statuses.append(status)
        await asyncio.sleep(0.02)


async def test_sigterm_drains_every_worker_and_exits_0(relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=2, **FAST)
    await wait_for_workers(relay, 2, generation=1)
    sids = sessions_per_slot(2, 2, "term")
    async with unlimited_http() as http:
        peers = []
        for slot_sids in sids.values():
            for sid in slot_sids:
                peers.append(await join(http, relay, sid, "host", "h"))
                peers.append(await join(http, relay, sid, "participant", "p"))
        probes = [await KeptAlive.open(relay.port) for _ in range(8)]
        for probe in probes:
            assert (await probe.get("/readyz"))[0] == 200

        loop = asyncio.get_running_loop()
        signalled_at = loop.time()
        relay.proc.send_signal(signal.SIGTERM)
        outcomes, statuses = await asyncio.gather(
            asyncio.gather(*(messages_until_close(p) for p in peers)),
            asyncio.gather(*(readyz_until_gone(probe) for probe in probes)))
        status = await wait_for_exit(relay, FAST["drain_timeout_s"] + 2)
        elapsed = loop.time() - signalled_at
        for probe in probes:
            probe.close()
    assert status == 0
    assert elapsed < FAST["drain_timeout_s"], elapsed
    for received, close in outcomes:
        events = [m for m in received if isinstance(m, dict)]
        assert all(m["type"] in ("draining", "peer_joined", "peer_left") for m in events), \
            received
        drainings = [i for i, m in enumerate(received)
                     if isinstance(m, dict) and m["type"] == "draining"]
        assert len(drainings) == 1 and drainings[0] == len(received) - 1, received
        assert 0 <= received[-1]["reconnect_after_ms"] <= FAST["drain_reconnect_spread_ms"]
        assert close == (1012, "SERVER_SHUTDOWN")
    # While draining, a worker says so on /readyz (on connections it already had), and
    # never goes back to ready.
    for seq in statuses:
        assert seq == sorted(seq), seq  # 200s, then 503s
    assert any(503 in seq for seq in statuses), statuses
    relay.stop()
    assert len(relay.events("drain.completed")) == 2, relay.lines[-20:]
    assert relay.events("supervisor.exited")[-1]["status"] == 0


async def slow_draining_node(relay_factory: Any, http: aiohttp.ClientSession, *,
                             term_first: bool
                             ) -> tuple[RelayProcess, list[asyncio.Task[Closed]], set[int]]:
    """A 2-worker node with 3 hosts per worker and a 30 s drain window; with ``term_first``,
    SIGTERM has been sent and both workers have told their first peer to reconnect.

    Returns the relay, each peer's future of (messages, close), and the indexes of the
    peers told to reconnect so far.
    """
    slow = dict(FAST, drain_timeout_s=30.0, drain_window_s=30.0)
    relay: RelayProcess = relay_factory(workers=2, **slow)
    await wait_for_workers(relay, 2, generation=1)
    sids = sessions_per_slot(2, 3, "fast")
    peers = [await join(http, relay, sid, "host", "h")
             for slot_sids in sids.values() for sid in slot_sids]
    closes = [asyncio.ensure_future(messages_until_close(p)) for p in peers]
    if not term_first:
        return relay, closes, set()
    relay.proc.send_signal(signal.SIGTERM)
    # The drain paces 3 peers per worker over 30 s: one is told at once, the next after
    # 10 s. Once both workers have told their first one, the drain is under way.
    await holds(lambda: sum(c.done() for c in closes) >= 2,
                "both workers to start draining", IO_TIMEOUT_S)
    told = {i for i, c in enumerate(closes) if c.done()}
    assert len(told) == 2, told
    return relay, closes, told


async def test_second_term_during_drain_exits_within_seconds(relay_factory: Any) -> None:
    async with unlimited_http() as http:
        relay, closes, told = await slow_draining_node(relay_factory, http, term_first=True)
        loop = asyncio.get_running_loop()
        signalled_at = loop.time()
        relay.proc.send_signal(signal.SIGTERM)
        status = await wait_for_exit(relay, 10.0)
        elapsed = loop.time() - signalled_at
        outcomes = await asyncio.gather(*closes)  # every connection ended
    assert elapsed < 5.0, f"exit took {elapsed:.1f}s after the second TERM (drain: 30 s)"
    assert status == 0
    for i in told:
        assert outcomes[i][1] == (1012, "SERVER_SHUTDOWN"), outcomes[i]
    relay.stop()
    assert relay.events("supervisor.stopping_fast"), relay.lines[-10:]


@pytest.mark.parametrize("term_first", [
    pytest.param(False, id="INT"),
    pytest.param(True, id="TERM-then-INT"),
])
async def test_fast_stop_closes_peers_with_going_away(relay_factory: Any,
                                                      term_first: bool) -> None:
    async with unlimited_http() as http:
        relay, closes, told = await slow_draining_node(relay_factory, http,
                                                       term_first=term_first)
        loop = asyncio.get_running_loop()
        signalled_at = loop.time()
        relay.proc.send_signal(signal.SIGINT)
        status = await wait_for_exit(relay, 10.0)
        elapsed = loop.time() - signalled_at
        outcomes = await asyncio.gather(*closes)
    assert elapsed < 5.0, f"exit took {elapsed:.1f}s after SIGINT"
    assert status == 0
    for i, (received, close) in enumerate(outcomes):
        if i not in told:  # closed at once, not told to reconnect later
            assert close == (1001, "GOING_AWAY"), (received, close)
    relay.stop()
    # The workers stopped by themselves; nobody had to be killed.
    assert not relay.events("supervisor.stop_deadline"), relay.lines[-10:]
    assert all(e["exit_code"] == 0 for e in relay.events("worker.exited")), \
        relay.events("worker.exited")


# --- TTIN / TTOU -------------------------------------------------------------------------------


async def test_ttin_adds_a_worker_and_ttou_removes_one(relay_factory: Any,
                                                       http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(workers=2, **FAST)
    first = await wait_for_workers(relay, 2, generation=1)

    relay.proc.send_signal(signal.SIGTTIN)
    completed = await log_event(relay, "reload.completed")
    assert completed["generation"] == 2
    grown = await wait_for_workers(relay, 3, generation=2)
    assert not set(grown.values()) & set(first.values())
    assert all(pid_gone(pid) for pid in first.values())
    # The third slot serves the sessions a three-slot ring gives it.
    await assert_pair_exchanges(http, relay, sessions_per_slot(3, 1, "ttin")[2][0])

    relay.proc.send_signal(signal.SIGTTOU)
    completed = await log_event(relay, "reload.completed")
    assert completed["generation"] == 3
    await wait_for_workers(relay, 2, generation=3)
    assert len(psutil.Process(relay.proc.pid).children()) == 2
    for sid in sessions_per_slot(2, 1, "ttou").values():
        await assert_pair_exchanges(http, relay, sid[0])
