"""``/metrics`` of a multi-worker node, scraped from outside while traffic flows.

The exposition is parsed with prometheus-client's own parser. Workers fold their plain
counters into Prometheus once a second, so every expectation is polled for at most
:data:`FOLD_WAIT_S` (the next beat) before it is asserted. Checked here: counters equal
the traffic the test peers actually received, hand-offs balance, the ``livesum`` gauges
return to zero when everyone leaves, the live series of a worker killed with
``SIGKILL`` disappear while every counter keeps its value, restarts are counted for the
right slot, no label carries an identity, and ``metrics_key`` guards the endpoint.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rescue.frames import HEADER_SIZE, Kind, encode_frame
from rescue.ring import Ring
from tests.support.client import TestPeer, join, open_ws
from tests.support.observe import POLL_INTERVAL_S, free_port, wait_until
from tests.support.relay import RelayProcess

ADMIN_KEY = "metrics-test-admin-key"
METRICS_KEY = "metrics-test-scrape-key"
P = "beach_rescue_"
FOLD_WAIT_S = 2.5  # one beat interval (1 s) plus scheduling slack
RESTART_WAIT_S = 10.0
IO_TIMEOUT_S = 10.0
FORBIDDEN_LABEL_PARTS = ("session", "peer", "connection_id", "token")
# Whole-frame sizes vary so that a per-message byte count cannot pass by accident.
HOST_FRAMES = [(Kind.DATA, 0), (Kind.DATA, 1), (Kind.DATA, 700), (Kind.CONTROL, 33),
               (Kind.DATA, 4096), (Kind.ACK, 4)]
PARTICIPANT_FRAMES = [(Kind.DATA, 17), (Kind.ACK, 4), (Kind.DATA, 250)]
CPU_AND_RESTARTS = {P + "worker_cpu_seconds_total", P + "worker_restarts_total"}


# --- reading the exposition ---------------------------------------------------------------


class Scrape:
    """One parsed exposition: ``{(sample name, sorted labels): value}``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.samples[key] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        """The sample's value, or None if the exposition has no such series."""
        return self.samples.get((P + name, tuple(sorted(labels.items()))))

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; an absent series counts as 0."""
        found = self.get(name, **labels)
        return 0.0 if found is None else found

    def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every counter sample except CPU time and restarts (which move on their own)."""
        return {k: v for k, v in self.samples.items()
                if k[0].endswith("_total") and k[0] not in CPU_AND_RESTARTS}

    def labels(self) -> set[tuple[str, str]]:
        """Every (label name, label value) pair in the exposition."""
        return {pair for _name, labels in self.samples for pair in labels}


async def scrape(http: aiohttp.ClientSession, relay: RelayProcess,
                 key: str | None = METRICS_KEY) -> Scrape:
    """GET ``/metrics`` on the admin listener with ``key`` as bearer; assert a 200."""
    status, text = await get_metrics(http, relay, key)
    assert status == 200, text
    return Scrape(text)


async def get_metrics(http: aiohttp.ClientSession, relay: RelayProcess,
                      key: str | None) -> tuple[int, str]:
    assert relay.admin_port, "this relay has no admin listener"
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.get(f"http://127.0.0.1:{relay.admin_port}/metrics", headers=headers,
                        timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        return resp.status, await resp.text()


async def scrape_until(http: aiohttp.ClientSession, relay: RelayProcess,
                       expected: dict[str, float], within_s: float = FOLD_WAIT_S) -> Scrape:
    """Scrape until every ``expected`` series (``name{a="b"}`` spelled as
    ``name|a=b``) has its value; fail showing the differences after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        got = await scrape(http, relay)
        seen = observed(got, expected)
        if seen == expected:
            return got
        if loop.time() >= deadline:
            diff = {k: (seen[k], v) for k, v in expected.items() if seen[k] != v}
            raise AssertionError(f"after {within_s}s, (scraped, expected): {diff}")
        await asyncio.sleep(POLL_INTERVAL_S)


def observed(got: Scrape, expected: dict[str, float]) -> dict[str, float]:
    out = {}
    for spec in expected:
        name, *pairs = spec.split("|")
        out[spec] = got.value(name, **dict(p.split("=", 1) for p in pairs))
    return out


# --- setting up traffic ------------------------------------------------------------------


def sessions_per_slot(slots: int, per_slot: int) -> list[str]:
    """Fresh session ids, ``per_slot`` owned by each worker slot of a ``slots`` node."""
    ring = Ring(range(slots))
    owned: dict[int, list[str]] = {s: [] for s in range(slots)}
    while any(len(v) < per_slot for v in owned.values()):
        sid = f"metrics-{uuid.uuid4().hex[:12]}"
        if len(owned[ring.owner(sid)]) < per_slot:
            owned[ring.owner(sid)].append(sid)
    return [sid for slot in range(slots) for sid in owned[slot]]


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """``{slot: pid}`` of the supervisor's live, titled worker children."""
    out: dict[int, int] = {}
    for child in psutil.Process(relay.proc.pid).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            words = [part for part in child.cmdline() if part]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        title = " ".join(words).split()
        if title[:2] == ["beach-rescue", "worker"] and len(title) >= 3:
            out[int(title[2])] = child.pid
    return out


class Tally:
    """What the test peers received: relayed frames and bytes by kind, heartbeat echoes."""

    def __init__(self) -> None:
        self.messages: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.echoes = 0

    async def receive(self, peer: TestPeer, count: int) -> None:
        for _ in range(count):
            frame = await peer.recv_frame(IO_TIMEOUT_S)
            if frame.kind is Kind.HEARTBEAT:
                self.echoes += 1
                continue
            self.messages[frame.kind.name.lower()] += 1
            self.bytes[frame.kind.name.lower()] += HEADER_SIZE + len(frame.payload)


async def join_all(http: aiohttp.ClientSession, relay: RelayProcess, sids: Iterable[str],
                   roles: Iterable[str]) -> list[TestPeer]:
    """Join one peer per (session, role), hosts first; each peer id is unique."""
    peers: list[TestPeer] = []
    for role in roles:
        peers += await asyncio.gather(*(
            join(http, relay, sid, role.rstrip("0123456789"),
                 f"{role}-{uuid.uuid4().hex[:12]}") for sid in sids))
    return peers


async def close_all(peers: Iterable[TestPeer]) -> None:
    await asyncio.gather(*(p.close() for p in peers))


def assert_no_identities(got: Scrape, identities: set[str]) -> None:
    """No label name names an identity, no label value is (or contains) one."""
    assert identities, "the test must have identities to look for"
    for name, value in got.labels():
        assert not any(part in name.lower() for part in FORBIDDEN_LABEL_PARTS), name
        leaked = [i for i in identities if i in value]
        assert not leaked, f"label {name}={value!r} carries {leaked}"


# --- the tests -----------------------------------------------------------------------------


async def test_counters_match_the_traffic_and_gauges_return_to_zero(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    workers = 4
    relay: RelayProcess = relay_factory(
        workers=workers, admin_port=free_port(), admin_key=ADMIN_KEY,
        metrics_key=METRICS_KEY, heartbeat_s=5.0, session_grace_s=1.0)
    await scrape_until(http, relay, {"workers": workers}, RESTART_WAIT_S)
    before = await scrape(http, relay)
    assert before.counters() and all(v == 0 for v in before.counters().values()), \
        {k: v for k, v in before.counters().items() if v}

    sids = sessions_per_slot(workers, 2)
    peers = await join_all(http, relay, sids, ("host", "participant1", "participant2"))
    joined = len(peers)
    by_session = {sid: [p for p in peers if p.session_id == sid] for sid in sids}
    await scrape_until(http, relay, {"connections": joined, "peers": joined,
                                     "sessions": len(sids), "workers": workers})

    # One upgrade refused for a bad token: counted apart from the hellos.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_ws(http, relay.ws_url(sids[0], "not-a-jwt"))
    assert refused.value.status == 401

    tally = Tally()
    for members in by_session.values():
        host, *participants = members
        for seq, (kind, size) in enumerate(HOST_FRAMES, 1):
            await host.send_raw(encode_frame(kind, seq, os.urandom(size)))
        for part in participants:
            for seq, (kind, size) in enumerate(PARTICIPANT_FRAMES, 1):
                await part.send_raw(encode_frame(kind, seq, os.urandom(size)))
            await part.send_frame(b"beat", Kind.HEARTBEAT)
    for members in by_session.values():
        host, *participants = members
        await tally.receive(host, len(participants) * len(PARTICIPANT_FRAMES))
        for part in participants:
            await tally.receive(part, len(HOST_FRAMES) + 1)  # + its heartbeat echo
    # The peers got exactly what was sent: one copy per receiver.
    n_parts = 2 * len(sids)
    assert tally.messages["data"] == len(sids) * 2 * 4 + n_parts * 2
    assert tally.echoes == n_parts

    expected = {f"messages_forwarded_total|kind={k}": float(v)
                for k, v in tally.messages.items()}
    expected |= {f"bytes_forwarded_total|kind={k}": float(v) for k, v in tally.bytes.items()}
    expected |= {
        "messages_forwarded_total|kind=heartbeat": 0.0,
        "heartbeats_answered_total": float(tally.echoes),
        "handshakes_total|outcome=ok": float(joined),
        "upgrades_refused_total|error=token_invalid": 1.0,
        "connections_accepted_total": float(joined + 1),
        "frames_unrouted_total": 0.0,
    }
    during = await scrape_until(http, relay, expected)
    out, into = during.value("handoffs_total", event="out"), during.value("handoffs_total",
                                                                           event="in")
    # With 4 workers about 3 in 4 connections land on a worker that does not own their
    # session; all of them must arrive (25 connections: P(no hand-off) < 1e-15).
    assert out == into > 0, during.text
    assert during.value("handoffs_total", event="failed") == 0
    assert during.value("handoffs_total", event="expired") == 0
    assert_no_identities(during, set(sids) | {p.peer_id for p in peers}
                         | {p.server_hello["connection_id"] for p in peers})

    await close_all(peers)
    after = await scrape_until(http, relay, {
        "connections": 0, "peers": 0, "workers": workers,
        "closes_total|reason=NORMAL": joined, **expected})
    assert after.value("handoffs_total", event="out") == out
    # Counters never moved backwards between the two scrapes.
    assert all(after.samples.get(k, 0) >= v for k, v in during.counters().items())


async def test_metrics_key_guards_the_endpoint(relay_factory: Any,
                                               http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(workers=2, admin_port=free_port(),
                                        admin_key=ADMIN_KEY, metrics_key=METRICS_KEY)
    for key in (None, "", "wrong", METRICS_KEY[:-1], METRICS_KEY + "x", ADMIN_KEY):
        status, body = await get_metrics(http, relay, key)
        assert status == 401, (key, body)
        assert P not in body, body
    async with http.get(relay.http_url("/metrics"),
                        headers={"Authorization": f"Bearer {METRICS_KEY}"}) as resp:
        assert resp.status == 404  # never on the public port
    got = await scrape_until(http, relay, {"workers": 2}, RESTART_WAIT_S)
    assert got.get("connections") == 0


async def test_killed_worker_leaves_live_gauges_and_counters_persist(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(workers=2, admin_port=free_port(),
                                        admin_key=ADMIN_KEY, metrics_key=METRICS_KEY,
                                        heartbeat_s=5.0)
    await scrape_until(http, relay, {"workers": 2}, RESTART_WAIT_S)
    victim_slot = 0
    sids = sessions_per_slot(2, 2)  # two sessions owned by each slot, slot 0's first
    peers = await join_all(http, relay, sids, ("host", "participant"))
    victims = [p for p in peers if p.session_id in sids[:2]]
    survivors = [p for p in peers if p.session_id in sids[2:]]
    for peer in peers:  # one data frame each way in every session
        await peer.send_frame(b"x" * 10)
    for peer in peers:
        assert (await peer.recv_frame(IO_TIMEOUT_S)).payload == b"x" * 10
    before = await scrape_until(http, relay, {
        "connections": len(peers), "peers": len(peers), "workers": 2,
        "messages_forwarded_total|kind=data": len(peers),
        "handshakes_total|outcome=ok": len(peers)})
    assert before.get("worker_restarts_total", slot=str(victim_slot)) == 0

    pids = worker_pids(relay)
    os.kill(pids[victim_slot], signal.SIGKILL)
    exited = await asyncio.to_thread(relay.wait_for_event, "worker.exited", IO_TIMEOUT_S)
    assert (exited["slot"], exited["worker_pid"], exited["asked"]) == \
        (victim_slot, pids[victim_slot], False), exited

    # The supervisor dropped the dead worker's live gauges before it logged the exit:
    # from now on its connections never count, and the workers gauge is 1 until the
    # restarted worker reports, never 3.
    seen_workers: list[float] = []

    async def restarted() -> Scrape | None:
        got = await scrape(http, relay)
        seen_workers.append(got.value("workers"))
        assert got.value("connections") <= len(survivors), got.text
        assert got.value("peers") <= len(survivors), got.text
        if got.value("workers") == 2:
            new_pid = worker_pids(relay).get(victim_slot)
            assert new_pid not in (None, pids[victim_slot]), "2 workers before the restart"
        ready = (got.value("workers"), got.value("connections")) == (2, len(survivors))
        return got if ready else None

    after = await wait_until(restarted, "the restarted worker to report", RESTART_WAIT_S)
    assert set(seen_workers) <= {1.0, 2.0} and seen_workers == sorted(seen_workers), \
        seen_workers
    assert after.value("peers") == len(survivors)
    assert after.counters() == before.counters(), {
        k: (before.counters().get(k), v) for k, v in after.counters().items()
        if before.counters().get(k) != v}
    assert after.get("worker_restarts_total", slot=str(victim_slot)) == 1
    assert after.get("worker_restarts_total", slot=str(1 - victim_slot)) == 0

    await close_all(victims)  # already dropped by the kernel; nothing to count
    await close_all(survivors)
    final = await scrape_until(http, relay, {"connections": 0, "peers": 0, "workers": 2})
    assert final.value("worker_restarts_total", slot=str(victim_slot)) == 1
    assert_no_identities(final, set(sids) | {p.peer_id for p in peers})
