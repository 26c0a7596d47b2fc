"""Chaos: sessions keep working through disconnects, worker kills, a stall and a Redis outage.

A real two-worker node keeps its control-plane state (guardrail counters, kill switch)
and its node-registry entry in Redis. Over the run, light sessions (a host and a
participant exchanging numbered frames) arrive and leave, and SDK channel pairs stream
both ways with end-to-end encryption and resume, taking their tokens from the node's
token API. Meanwhile, on a schedule drawn from one seed (``--chaos-seed`` replays it):

- every second, 5 % of the connected peers lose their TCP connection (aborted client
  side, no close frame) and reconnect;
- every 10 s a random worker is SIGKILLed (the supervisor restarts it in its slot);
- a worker is stopped with SIGSTOP for 2 s (a CPU stall), then continued;
- redis-server is SIGKILLed and restarted empty on the same port a few seconds later.

The verdict:

- reconnect success ≥ 99.5 % (the plan's bar; every loss of every light peer counts,
  and a reconnect has failed when the peer was not back within 15 s);
- ≥ 99.5 % of light sessions settle at their end (both peers connected and hearing each
  other on their current connections);
- every SDK pair got all its bytes both ways, in order (SHA-256), every close was
  acknowledged, no channel failed;
- the token API answered 503 ``store_unavailable`` only while Redis was down (and a
  recovery window after), and issued tokens again within that window;
- the node is healthy at the end: both slots serve (the stalled worker was kept, the
  killed ones replaced, no boot loop), ``/readyz`` is 200, the store is healthy, the
  registry lists the node again, and a fresh pair relays.

Short mode (the default suite): a 30 s window, 1,000 light sessions and 20 SDK pairs.
``--chaos-long``: 300 s, 6,000 sessions, 100 pairs. At most a few hundred sessions are
open at once (about 300 in short mode: 600 sockets in this process), because sessions
churn over the window instead of all being held together.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from rescue.client.channel import Channel
from rescue.cluster.registry import NODE_KEY_PREFIX
from tests.chaos.conftest import ChaosMode
from tests.support.chaos_peers import AbortableChannel, ChaosPeer, chaos_http
from tests.support.chaos_plan import ChaosPlan, DisconnectPicker, make_plan
from tests.support.churn import LightSession, reconnect_tally, run_light_session
from tests.support.client import assert_relaying, join_relaying_pair
from tests.support.faults import FaultLog, run_faults
from tests.support.observe import wait_until
from tests.support.processes import wait_for_workers
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess
from tests.support.sdk_pairs import PairResult, run_pair
from tests.support.token_probe import TokenProbe, probe_tokens

pytestmark = pytest.mark.chaos

SERVICE_KEY = "chaos-service-key"
ADMIN_KEY = "chaos-admin-key"
SETTINGS: dict[str, Any] = {
    "workers": 2,
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 10.0,
    "drain_window_s": 1.0,
    "drain_reconnect_spread_ms": 200,
    "session_grace_s": 5.0,
    "handoff_hold_s": 5.0,
    "service_keys": SERVICE_KEY,
    "admin_key": ADMIN_KEY,
    "redis_timeout_s": 0.2,
    "pause_poll_s": 0.3,
    "registry_ttl_s": 3.0,
    "mint_rate_per_service_key_per_s": 1000.0,
}
RECONNECT_BAR = 0.995
GIVE_UP_S = 15.0  # a light peer not back this long after a loss has failed to reconnect
SETTLE_S = 20.0
SEND_INTERVAL_S = 0.5
TOKEN_RECOVERY_S = 10.0  # after Redis is back, tokens are issued again within this
TOKEN_ANSWER_S = 8.0  # every token answer, outage or not (a 2 s stall included)
PROBE_INTERVAL_S = 0.5
END_WAIT_S = 20.0
PAIR_MARGIN_S = {False: 30.0, True: 90.0}  # how long past its lifetime a pair may take


class Run:
    """The live state of one chaos run, shared by its tasks."""

    def __init__(self, plan: ChaosPlan) -> None:
        self.plan = plan
        self.live_peers: set[ChaosPeer] = set()
        self.live_channels: set[Channel] = set()
        self.sessions: list[LightSession] = []
        self.pairs: list[PairResult] = []
        self.probes: list[TokenProbe] = []
        self.faults = FaultLog()
        self.aborts = 0
        self.abort_ticks = 0


def abortable(run: Run) -> list[tuple[str, Callable[[], bool]]]:
    """Connected peers and channels in their live phase, in a stable order."""
    found: list[tuple[str, Callable[[], bool]]] = [
        (f"{p.session_id}/{p.role}", p.abort) for p in run.live_peers if p.connected]
    found += [(f"{c.session_id}/{c.role}", c.abort) for c in run.live_channels
              if isinstance(c, AbortableChannel) and c.connected]
    return sorted(found, key=lambda item: item[0])


async def disconnect_loop(run: Run, started_at: float) -> None:
    """Every second of the window, abort ``disconnect_share_per_s`` of the connected."""
    loop = asyncio.get_running_loop()
    picker = DisconnectPicker(run.plan.picks_seed, run.plan.shape.disconnect_share_per_s)
    tick = 1
    while tick <= run.plan.shape.duration_s:
        await asyncio.sleep(max(0.0, started_at + tick - loop.time()))  # the 1 s beat
        run.abort_ticks += 1
        for _key, abort in picker.pick(abortable(run)):
            run.aborts += abort()
        tick += 1


async def sessions_loop(run: Run, http: aiohttp.ClientSession, relay: RelayProcess,
                        started_at: float) -> None:
    """Start each light session at its planned time; return when all have ended."""
    loop = asyncio.get_running_loop()
    tasks = []
    for i, arrival in enumerate(run.plan.sessions):
        await asyncio.sleep(max(0.0, started_at + arrival.at_s - loop.time()))  # schedule
        tasks.append(asyncio.create_task(run_light_session(
            http, relay, f"chaos-{run.plan.seed}-{i}", arrival.lifetime_s,
            live=run.live_peers, send_interval_s=SEND_INTERVAL_S, give_up_s=GIVE_UP_S,
            settle_s=SETTLE_S, record=run.sessions)))
    await asyncio.gather(*tasks)


async def pairs_loop(run: Run, relay: RelayProcess, mode: ChaosMode,
                     started_at: float) -> None:
    """Start each SDK pair at its planned time; return when all have ended."""
    loop = asyncio.get_running_loop()
    tasks = []
    for i, arrival in enumerate(run.plan.sdk_pairs):
        await asyncio.sleep(max(0.0, started_at + arrival.at_s - loop.time()))  # schedule
        tasks.append(asyncio.create_task(run_pair(
            AbortableChannel, relay.http_url(""), SERVICE_KEY, f"sdk-{run.plan.seed}-{i}",
            down=mode.sdk_down_bytes, up=mode.sdk_up_bytes, lifetime_s=arrival.lifetime_s,
            seed=run.plan.seed * 1000 + i, live=run.live_channels,
            margin_s=PAIR_MARGIN_S[mode.long])))
    run.pairs = list(await asyncio.gather(*tasks))


# --- the verdict on the token API ----------------------------------------------------------


def check_token_api(run: Run) -> None:
    """Assert the token API's answers fit the Redis outages."""
    killed, restarted = run.faults.times("redis.killed"), run.faults.times("redis.restarted")
    assert len(killed) == len(restarted) == len(run.plan.outages), run.faults.events
    windows = list(zip(killed, restarted, strict=True))
    unexplained = []
    for probe in run.probes:
        assert probe.took_s < TOKEN_ANSWER_S, f"a token answer took {probe.took_s:.1f}s: {probe}"
        if probe.status == 200:
            continue
        # Sent up to an answer's time before the kill was confirmed, or before recovery.
        in_outage = any(down - TOKEN_ANSWER_S <= probe.at <= up + TOKEN_RECOVERY_S
                        for down, up in windows)
        if not (in_outage and (probe.status, probe.error) == (503, "store_unavailable")):
            unexplained.append(probe)
    assert not unexplained, f"token answers outside the Redis outages: {unexplained[:5]}"
    for down, up in windows:
        during = [p for p in run.probes if down <= p.at < up]
        assert any(p.status == 503 for p in during), \
            f"no 503 while Redis was down ({down:.1f}..{up:.1f}): {during}"
        assert any(p.status == 200 and up <= p.at <= up + TOKEN_RECOVERY_S
                   for p in run.probes), \
            f"no token within {TOKEN_RECOVERY_S}s of Redis' return at {up:.1f}"


# --- the node at the end ----------------------------------------------------------------


async def assert_node_healthy(relay: RelayProcess, redis: RedisServer, run: Run) -> None:
    """Both slots serve, the node is ready, the store healthy, listed, and relaying."""
    workers = await wait_for_workers(relay, 2, generation=1, within_s=END_WAIT_S)
    killed = {int(str(d["pid"])) for d in run.faults.named("worker.killed")}
    assert not killed & set(workers.values()), "a killed worker is still listed"
    assert relay.proc.poll() is None, "the supervisor exited"
    unasked = [e for e in relay.events("worker.exited") if not e["asked"]]
    assert sorted(int(e["worker_pid"]) for e in unasked) == sorted(killed), unasked
    assert all(e["exit_code"] == -signal.SIGKILL for e in unasked), unasked
    assert not relay.events("supervisor.boot_loop")
    # A 2 s stall is far below worker_liveness_timeout_s: the stopped worker was kept.
    assert not relay.events("worker.stuck"), relay.events("worker.stuck")
    stalled = {int(str(d["pid"])) for d in run.faults.named("worker.stopped")} - killed
    assert stalled <= set(workers.values()), (stalled, workers)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def status_ok() -> bool:
            async with http.get(relay.http_url("/v1/status")) as resp:
                return resp.status == 200 and (await resp.json())["store_healthy"] is True

        await wait_until(status_ok, "the store to be healthy", END_WAIT_S)
        for path in ("/healthz", "/readyz"):
            for _ in range(4):  # fresh connections: more than one worker answers
                async with http.get(relay.http_url(path)) as resp:
                    assert resp.status == 200, (path, resp.status, await resp.text())
        client = aioredis.Redis.from_url(redis.url)
        try:
            async def listed() -> bool:
                keys = await client.keys(NODE_KEY_PREFIX + "*")
                return len(keys) == 1 and len(await client.hgetall(keys[0])) == 2

            await wait_until(listed, "the node's two worker records in the registry",
                             END_WAIT_S)
        finally:
            await client.aclose()
        sid = f"after-{run.plan.seed}"
        async with http.post(relay.http_url("/v1/fallback/token"), json={"session_id": sid},
                             headers={"Authorization": f"Bearer {SERVICE_KEY}"}) as resp:
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["token"]
        host, part = await join_relaying_pair(http, relay, sid, token)
        await assert_relaying(host, part)
        await host.close()
        await part.close()


# --- the test -----------------------------------------------------------------------------


async def test_sessions_survive_chaos(redis_server: RedisServer,
                                      relay_factory: Callable[..., RelayProcess],
                                      key_dir: Path, chaos_mode: ChaosMode,
                                      chaos_seed: int) -> None:
    # redis_server comes first: set up first, torn down last, so the relay stops with its
    # Redis up (a stop with Redis gone is not what this test is about).
    plan = make_plan(chaos_seed, chaos_mode.chaos)
    print(f"chaos plan: {plan.describe()}")
    relay = relay_factory(**SETTINGS, signing_keys=str(key_dir), redis_url=redis_server.url,
                          registry_redis_url=redis_server.url)
    await wait_for_workers(relay, 2, generation=1)
    run = Run(plan)
    loop = asyncio.get_running_loop()
    async with chaos_http() as http:
        started_at = loop.time()
        background = [asyncio.create_task(disconnect_loop(run, started_at)),
                      asyncio.create_task(probe_tokens(relay, SERVICE_KEY, PROBE_INTERVAL_S,
                                                       run.probes))]
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(run_faults(plan, relay, redis_server, started_at,
                                             run.faults))
                group.create_task(sessions_loop(run, http, relay, started_at))
                group.create_task(pairs_loop(run, relay, chaos_mode, started_at))
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        elapsed = loop.time() - started_at
    peers = [p for s in run.sessions for p in s.peers]
    tally = reconnect_tally(peers)
    settled = sum(s.ok for s in run.sessions)
    intact = [p for p in run.pairs if p.intact]
    streamed = sum(p.down.received_bytes + p.up.received_bytes for p in run.pairs)
    outages = list(zip(run.faults.times("redis.killed"), run.faults.times("redis.restarted"),
                       strict=True))
    started_in_outage = sum(any(down <= p.started_at < up for down, up in outages)
                            for p in run.pairs)
    sdk_reconnects = sum(p.connections for p in run.pairs) - 2 * len(run.pairs)
    summary = (
        f"{plan.describe()} | ran {elapsed:.1f}s | light sessions {len(run.sessions)}, "
        f"settled {settled} | reconnects {tally.succeeded}/{tally.losses} = "
        f"{tally.success_rate:.4%} (first try {tally.first_try}, cut short by the session's "
        f"end {tally.cut_short}, p50 "
        f"{tally.percentile_s(0.5):.2f}s, p99 {tally.percentile_s(0.99):.2f}s) | aborts "
        f"{run.aborts} in {run.abort_ticks} ticks | "
        f"SDK pairs {len(intact)}/{len(run.pairs)} "
        f"intact ({started_in_outage} started while Redis was down), "
        f"{streamed / 2**20:.1f} MiB streamed, {sdk_reconnects} channel reconnects | "
        f"token probes: {len(run.probes)} ({sum(p.status == 503 for p in run.probes)} "
        f"answered 503)")
    print(f"chaos result: {summary}")
    for failure in tally.failures[:10]:
        print(f"failed reconnect: {failure}")

    assert len(run.sessions) == len(plan.sessions) >= 1000, summary
    assert tally.losses >= len(plan.sessions) // 2, f"too little chaos: {summary}"
    assert tally.success_rate >= RECONNECT_BAR, \
        f"reconnect success {tally.success_rate:.4%} < {RECONNECT_BAR:.1%}: {summary}; " \
        f"failures: {tally.failures[:5]}"
    failed_sessions = [s for s in run.sessions if not s.ok]
    assert settled / len(run.sessions) >= RECONNECT_BAR, \
        f"{summary}; unsettled: {[(s.session_id, s.outcome) for s in failed_sessions[:5]]}"
    assert len(intact) == len(run.pairs) == len(plan.sdk_pairs), \
        f"{summary}; {[p.describe() for p in run.pairs if not p.intact]}"
    assert sdk_reconnects > 0, f"no SDK channel was ever disconnected: {summary}"
    assert run.aborts > 0 and len(run.faults.named("worker.killed")) == len(plan.kills)
    assert run.faults.named("worker.stopped") and run.faults.named("worker.continued")
    check_token_api(run)
    await assert_node_healthy(relay, redis_server, run)
