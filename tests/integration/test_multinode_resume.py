"""SDK transfers survive losing one of three nodes (issue #8), in both multi-node modes.

Six sessions each stream 20 MiB host → participant and 1 MiB back over SDK ``Channel``s,
paced over 8 s so that the disruption and the moves meet both directions in flight
however fast the machine is (checked: each moved channel was back before its session's
streams were complete). Mid-transfer, one node holding at least two of them is
SIGKILLed (a machine that died) or SIGTERMed (a node that drains). Every session must
complete with equal SHA-256 on both sides and no channel may fail; the sessions of the
lost node must have reconnected and ended up, both peers together, on a surviving node;
the others must not have moved.

- Behind HAProxy, the sessions' nodes come from the ring HAProxy builds: the test
  finds them (each node logs the ``connection_id`` it hands a client) and disrupts the
  node holding the most (six sessions over three nodes: at least two). After a kill,
  attempts fail (HAProxy answers 503 while its checks still call the node up) until
  ``fall`` checks took it out; then ``hash-type consistent`` sends both peers of each of
  its sessions to the same next node on the ring.
- With control-plane routing, the sessions are chosen by the control plane's own hash
  (two per node). After a kill, the control plane names the dead node (connection
  refused) until its registry entry expires; then a fresh grant names a survivor.
- SIGTERM in either mode: the node is out of rotation during its notice, so each peer it
  tells to leave gets back on the first attempt, and it exits 0 within its deadline.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.client.backoff import BackoffPolicy
from rescue.client.channel import ChannelOptions
from rescue.client.grants import ControlPlaneTokens, StaticToken, TokenSource
from rescue.keys import SigningKey
from rescue.ring import Ring
from tests.support.clusters import Cluster, haproxy_cluster, routed_cluster
from tests.support.haproxy import haproxy_binary
from tests.support.nodes import kill_node
from tests.support.observe import wait_until
from tests.support.redis import redis_server_binary
from tests.support.sdk_transfer import SessionTransfer

NODES = 3
SESSIONS = 6
DOWN = 20 << 20
UP = 1 << 20
SPREAD_S = 8.0  # each direction's pace: its bytes spread over this long
DISRUPT_AT = 2 << 20  # every session of the victim has received this much: mid-transfer
TRANSFER_TIMEOUT_S = 45.0
WAIT_S = 20.0
SERVICE_KEY = "multinode-resume-service-key"
REGISTRY_TTL_S = 2.0
# Short client backoff so a session is back within a fraction of a second of its new
# node becoming reachable; the give-up bound is far above any re-homing time here.
OPTIONS = ChannelOptions(backoff=BackoffPolicy(base_s=0.05, cap_s=0.5, give_up_after_s=30.0),
                         linger_s=20.0)
COMMON: dict[str, Any] = {
    "workers": 1,
    "drain_window_s": 1.0,
    "drain_timeout_s": 8.0,
    "drain_reconnect_spread_ms": 300,
    "heartbeat_s": 5.0,
    "log_level": "info",
    # The default per-connection limit (2 MiB/s sustained) would close these bulk
    # transfers with 4007 and add reconnects of their own; only the node's loss may.
    "rate_messages_per_s": 1e9,
    "rate_messages_burst": 10**9,
    "rate_bytes_per_s": 1e12,
    "rate_bytes_burst": 10**12,
}
HAPROXY_SETTINGS = dict(COMMON, proxy_protocol=True, drain_notice_s=1.0)
ROUTED_SETTINGS = dict(COMMON, drain_notice_s=0.5)


@dataclass
class Outcome:
    """What a disruption did to the transfers."""

    victim: str
    home: dict[str, str]  # session id → node it started on
    at: float  # loop time the signal was sent
    transfers: list[SessionTransfer]
    took_s: float = 0.0  # from the first connect attempt to the last completion
    status: int | None = None  # the victim's exit status
    exited_in_s: float | None = None  # from the signal to the victim's exit
    rehomed: dict[str, str] = field(default_factory=dict)  # moved session id → new node
    watched: float | None = None  # what the watch beside the transfers returned

    def moved(self) -> list[SessionTransfer]:
        """The sessions that were on the victim."""
        return [t for t in self.transfers if self.home[t.session_id] == self.victim]

    def stayed(self) -> list[SessionTransfer]:
        """The sessions on the other nodes."""
        return [t for t in self.transfers if self.home[t.session_id] != self.victim]

    def rehome_s(self) -> list[float]:
        """Per channel of a moved session: seconds from the signal to its new connection."""
        return [t.seen(role, "connected", self.at)[0].at - self.at
                for t in self.moved() for role in ("host", "participant")]

    def attempts(self) -> list[int]:
        """Per channel of a moved session: reconnect attempts after the signal."""
        return [len(t.seen(role, "reconnecting", self.at))
                for t in self.moved() for role in ("host", "participant")]


def needs(name: str, path: str | None) -> str:
    """The binary's path; skip the test when it is not installed."""
    if path is None:
        pytest.skip(f"{name} is needed (scripts/dev.sh installs it)")
    return path


@pytest.fixture
def behind_haproxy(key_dir: Path, signing_key: SigningKey,
                   tmp_path: Path) -> Iterator[Cluster]:
    """Three fresh nodes behind a fresh HAProxy (each test stops one of the nodes)."""
    binary = needs("haproxy", haproxy_binary())
    with haproxy_cluster(binary, NODES, key_dir, signing_key, tmp_path,
                         **HAPROXY_SETTINGS) as cluster:
        yield cluster


@pytest.fixture
def routed(key_dir: Path, signing_key: SigningKey, tmp_path: Path) -> Iterator[Cluster]:
    """Three fresh nodes in a fresh Redis registry, and a control plane routing to them."""
    binary = needs("redis-server", redis_server_binary())
    with routed_cluster(binary, NODES, key_dir, signing_key, tmp_path,
                        service_key=SERVICE_KEY, registry_ttl_s=REGISTRY_TTL_S,
                        **ROUTED_SETTINGS) as cluster:
        yield cluster


def haproxy_transfers(cluster: Cluster) -> list[SessionTransfer]:
    """Sessions through HAProxy's plain frontend, each peer with its own minted token."""
    haproxy = cluster.haproxy
    assert haproxy is not None
    url = f"ws://127.0.0.1:{haproxy.http_port}/ws"

    def tokens_for(sid: str) -> Callable[[str], TokenSource]:
        return lambda role: StaticToken(haproxy.mint(sid))

    sids = [f"hr-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    return [SessionTransfer(sid, url, tokens_for(sid), down=DOWN, up=UP, seed=i * 2,
                            spread_s=SPREAD_S, options=OPTIONS) for i, sid in enumerate(sids)]


def routed_transfers(cluster: Cluster, http: aiohttp.ClientSession) -> list[SessionTransfer]:
    """Two sessions per node by the control plane's hash; tokens (and the relay URL) from
    the control plane, as the SDK gets them in production."""
    assert cluster.control_plane is not None
    base = cluster.control_plane.url("")
    ring = Ring(sorted(f"node-{i}" for i in range(NODES)))
    wanted = Counter({f"node-{i}": SESSIONS // NODES for i in range(NODES)})
    sids: list[str] = []
    while len(sids) < SESSIONS:
        sid = f"rr-{uuid.uuid4().hex[:10]}"
        if wanted[ring.owner(sid)] > 0:
            wanted[ring.owner(sid)] -= 1
            sids.append(sid)

    def tokens_for(sid: str) -> Callable[[str], TokenSource]:
        return lambda role: ControlPlaneTokens(base, SERVICE_KEY, sid, http=http)

    return [SessionTransfer(sid, None, tokens_for(sid), down=DOWN, up=UP, seed=i * 2,
                            spread_s=SPREAD_S, options=OPTIONS) for i, sid in enumerate(sids)]


async def disrupt(cluster: Cluster, transfers: list[SessionTransfer],
                  pick: Callable[[dict[str, str]], str], sig: signal.Signals, *,
                  watch: Callable[[str], Awaitable[float]] | None = None) -> Outcome:
    """Connect and start every transfer, find each session's node, send ``sig`` to the
    node ``pick`` chooses once its sessions are mid-transfer, and wait for every transfer
    to complete (or fail). ``watch(victim)`` runs from the signal on, alongside the
    transfers; what it returns is kept in :attr:`Outcome.watched`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*(t.start() for t in transfers))
        home = {}
        for t in transfers:
            [host_cid], [part_cid] = t.connection_ids("host"), t.connection_ids("participant")
            host_node = await cluster.wait_node_of(host_cid)
            assert await cluster.wait_node_of(part_cid) == host_node, t.describe()
            home[t.session_id] = host_node
        victim = pick(home)
        for t in transfers:
            t.begin()
        outcome = Outcome(victim, home, 0.0, transfers)
        moved = outcome.moved()
        assert len(moved) >= 2, home

        async def mid_transfer() -> bool:
            return all(t.result.down.received_bytes >= DISRUPT_AT for t in moved)

        await wait_until(mid_transfer, "the victim's sessions to be under way", WAIT_S)
        node = cluster.node(victim)
        outcome.at = loop.time()
        if sig == signal.SIGKILL:
            await asyncio.to_thread(kill_node, node)
        else:
            node.proc.send_signal(sig)
        assert all(t.result.down.received_bytes < DOWN for t in moved), \
            "a session was complete before the disruption: the test proves nothing"

        async def exit_status() -> int:  # from the signal on, so its time is the exit's
            await wait_until(lambda: asyncio.sleep(0, node.proc.poll() is not None),
                             "the node to exit", TRANSFER_TIMEOUT_S)
            outcome.exited_in_s = loop.time() - outcome.at
            return node.proc.returncode

        exiting = asyncio.ensure_future(exit_status())
        watching = asyncio.ensure_future(
            watch(victim) if watch is not None else asyncio.sleep(0))
        try:
            async with asyncio.timeout(TRANSFER_TIMEOUT_S):
                await asyncio.gather(*(t.finish() for t in transfers))
                outcome.watched = await watching
                outcome.status = await exiting
        except TimeoutError:
            raise AssertionError("not done in time: " + " | ".join(
                t.describe() for t in transfers)) from None
        finally:
            for task in (watching, exiting):
                task.cancel()
            await asyncio.gather(watching, exiting, return_exceptions=True)
        outcome.took_s = loop.time() - started
        for t in moved:
            assert all(t.seen(r, "connected", outcome.at) for r in ("host", "participant")), \
                f"a channel was not back when its session completed: {t.describe()}"
            host_node, part_node = [await cluster.wait_node_of(t.connection_ids(r)[-1])
                                    for r in ("host", "participant")]
            assert host_node == part_node, t.describe()
            outcome.rehomed[t.session_id] = host_node
        return outcome
    finally:
        await asyncio.gather(*(t.close() for t in transfers))


def check_every_byte_arrived(outcome: Outcome) -> None:
    """Every session intact (equal digests, acknowledged, no failure); the victim's moved
    to a survivor, both peers together; the others never reconnected."""
    for t in outcome.transfers:
        assert t.result.intact, t.describe()
    for t in outcome.moved():
        assert all(c.connections >= 2 for c in t.channels.values()), t.describe()
        assert outcome.rehomed[t.session_id] != outcome.victim, t.describe()
        for role in ("host", "participant"):  # back while both streams were under way
            back = t.seen(role, "connected", outcome.at)[0]
            assert back.down_received < DOWN and back.up_received < UP, t.describe()
    for t in outcome.stayed():
        assert all(c.connections == 1 for c in t.channels.values()), t.describe()


def report(mode: str, outcome: Outcome) -> None:
    """Print what was measured (shown with ``pytest -s``)."""
    rehome = outcome.rehome_s()
    print(f"\n{mode}: victim {outcome.victim} held {len(outcome.moved())}/{SESSIONS} "
          f"sessions; all done {outcome.took_s:.1f} s after the first connect; re-homed "
          f"in {min(rehome):.2f}-{max(rehome):.2f} s; reconnect attempts per channel "
          f"{sorted(outcome.attempts())}; moved to {sorted(outcome.rehomed.values())}"
          + f"; exit {outcome.status} after {outcome.exited_in_s:.2f} s")


def most_loaded(home: dict[str, str]) -> str:
    """The node that holds the most sessions (the first by name on a tie)."""
    counts = Counter(home.values())
    return min(counts, key=lambda name: (-counts[name], name))


def check_drained_cleanly(cluster: Cluster, outcome: Outcome) -> None:
    """Exit 0 within the drain deadline, every peer told to leave, and each back on its
    first attempt (the node was out of rotation before it told them)."""
    node = cluster.node(outcome.victim)
    assert outcome.status == 0
    assert outcome.exited_in_s is not None
    assert outcome.exited_in_s < COMMON["drain_timeout_s"], outcome.exited_in_s
    assert node.events("drain.completed") and not node.events("drain.deadline")
    for t in outcome.moved():
        for role in ("host", "participant"):
            assert t.seen(role, "draining", outcome.at), t.describe()
            assert len(t.seen(role, "reconnecting", outcome.at)) == 1, t.describe()
            assert t.channels[role].connections == 2, t.describe()


# --- behind HAProxy ----------------------------------------------------------------------------

async def test_sigkill_a_node_behind_haproxy_every_session_resumes_on_a_survivor(
        behind_haproxy: Cluster) -> None:
    cluster = behind_haproxy
    haproxy = cluster.haproxy
    assert haproxy is not None
    outcome = await disrupt(cluster, haproxy_transfers(cluster), most_loaded, signal.SIGKILL)
    report("haproxy SIGKILL", outcome)
    check_every_byte_arrived(outcome)
    assert haproxy.statuses()[outcome.victim] == "DOWN"
    # The first attempts came before HAProxy's checks had taken the node out: HAProxy
    # sent them to the dead node, retried there (retries 2, a second apart) and answered
    # 503; the next attempt went to a survivor.
    assert any(n > 1 for n in outcome.attempts()), outcome.attempts()
    assert max(outcome.rehome_s()) < 10.0, outcome.rehome_s()


async def test_sigterm_a_node_behind_haproxy_drains_and_no_session_fails(
        behind_haproxy: Cluster) -> None:
    cluster = behind_haproxy
    haproxy = cluster.haproxy
    assert haproxy is not None
    routed_before: list[int] = []

    async def out_of_rotation(victim: str) -> float:
        routed_before.append(haproxy.sessions_total(victim))  # all channels connected
        return await haproxy.wait_status(victim, "DOWN", WAIT_S)

    outcome = await disrupt(cluster, haproxy_transfers(cluster), most_loaded, signal.SIGTERM,
                            watch=out_of_rotation)
    report("haproxy SIGTERM", outcome)
    check_every_byte_arrived(outcome)
    check_drained_cleanly(cluster, outcome)
    # HAProxy saw the node not ready during its notice, and sent it nothing new: every
    # reconnect of its sessions went to another node.
    assert outcome.watched is not None
    print(f"HAProxy marked {outcome.victim} DOWN {outcome.watched - outcome.at:.2f} s "
          "after the SIGTERM")
    assert outcome.watched - outcome.at < HAPROXY_SETTINGS["drain_notice_s"]
    assert haproxy.sessions_total(outcome.victim) == routed_before[0]


# --- control-plane routing ------------------------------------------------------------------

async def test_sigkill_a_routed_node_sessions_rehome_when_its_entry_expires(
        routed: Cluster) -> None:
    cluster = routed
    loop = asyncio.get_running_loop()

    async def expiry(victim: str) -> float:
        async def gone() -> bool:
            return "node-1" not in await cluster.registry_view(REGISTRY_TTL_S)

        await wait_until(gone, "the killed node's entry to expire", WAIT_S)
        return loop.time()

    async with aiohttp.ClientSession() as http:
        outcome = await disrupt(cluster, routed_transfers(cluster, http),
                                lambda home: "node-1", signal.SIGKILL, watch=expiry)
    report("routed SIGKILL", outcome)
    check_every_byte_arrived(outcome)
    assert Counter(outcome.home.values()) == {f"node-{i}": 2 for i in range(NODES)}
    expired = outcome.watched
    assert expired is not None
    print(f"registry entry expired {expired - outcome.at:.2f} s after the kill")
    assert expired - outcome.at <= REGISTRY_TTL_S + 1.0
    # The control plane kept naming the dead node until its entry expired: no moved
    # channel got anywhere before that (within the watcher's polling slack).
    assert min(outcome.rehome_s()) >= expired - outcome.at - 0.25, \
        (outcome.rehome_s(), expired - outcome.at)
    assert any(n > 1 for n in outcome.attempts()), outcome.attempts()


async def test_sigterm_a_routed_node_drains_and_no_session_fails(routed: Cluster) -> None:
    cluster = routed
    async with aiohttp.ClientSession() as http:
        outcome = await disrupt(cluster, routed_transfers(cluster, http),
                                lambda home: "node-1", signal.SIGTERM)
    report("routed SIGTERM", outcome)
    check_every_byte_arrived(outcome)
    check_drained_cleanly(cluster, outcome)

    async def withdrawn() -> bool:
        return "node-1" not in await cluster.registry_view(REGISTRY_TTL_S)

    await wait_until(withdrawn, "the drained node's entry to go", WAIT_S)
