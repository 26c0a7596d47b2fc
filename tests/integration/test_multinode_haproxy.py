"""Three relay nodes behind a real HAProxy (deploy/haproxy), with the node registry in a
real Redis: both peers of every session meet on one node, sessions spread over all three,
TLS ends at HAProxy, nodes read the PROXY header, and a node stopped with SIGTERM leaves
the balancer before its peers move, so no session fails.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.cluster.redis_registry import RedisRegistry
from rescue.cluster.registry import node_views
from rescue.keys import SigningKey
from rescue.proxy_protocol import format_v1, format_v2
from tests.support.client import (
    TestPeer,
    client_hello,
    join_relaying_pair,
    open_ws,
)
from tests.support.haproxy import (
    CONFIG,
    TEMPLATE,
    HAProxy,
    haproxy_binary,
    render,
    self_signed_certificate,
)
from tests.support.nodes import proxied_get, start_nodes
from tests.support.observe import wait_for_exit, wait_for_log, wait_until
from tests.support.reconnecting import ReconnectingPeer, Swarm, describe, unlimited_http
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.relay import RelayProcess

NODES = 3
SESSIONS = 300
CONCURRENCY = 50
# Fair share is 100 sessions a node. HAProxy's ring (weight 100: 1,600 points a node)
# is within a few per cent of even, and the binomial spread of 300 random sessions has
# a standard deviation of about 8: [60, 140] is more than 4 of them on either side.
BALANCE_BOUND = (60, 140)
WAIT_S = 20.0
SETTINGS: dict[str, Any] = {
    "workers": 1,
    "proxy_protocol": True,
    "registry_ttl_s": 3.0,
    "drain_notice_s": 1.0,  # HAProxy (200 ms checks, fall 2) needs well under that
    "drain_window_s": 1.0,
    "drain_timeout_s": 8.0,
    "drain_reconnect_spread_ms": 300,
    "heartbeat_s": 5.0,
    "max_connections_per_session": 16,
    "log_level": "info",
}


@dataclass
class Cluster:
    """Redis, the nodes and HAProxy in front of them."""

    redis: RedisServer
    nodes: list[RelayProcess]
    haproxy: HAProxy

    def node(self, name: str) -> RelayProcess:
        return self.nodes[int(name.rsplit("-", 1)[1])]


@pytest.fixture(scope="module")
def cluster(key_dir: Path, signing_key: SigningKey,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary, redis_binary = haproxy_binary(), redis_server_binary()
    if binary is None or redis_binary is None:
        pytest.skip("haproxy and redis-server are needed (scripts/dev.sh installs them)")
    base = tmp_path_factory.mktemp("multinode-haproxy")
    (base / "redis").mkdir()
    redis = RedisServer(redis_binary, base / "redis")
    redis.start()
    nodes: list[RelayProcess] = []
    haproxy: HAProxy | None = None
    try:
        # node-0 logs at debug level, so the PROXY header's client address can be seen;
        # node-2 has two workers, so connections are handed off after the header is read.
        nodes = start_nodes(NODES, key_dir, signing_key, base, per_node={
            0: {"log_level": "debug"}, 2: {"workers": 2}}, registry_redis_url=redis.url,
            **SETTINGS)
        haproxy = HAProxy(binary, [(f"node-{i}", n.port) for i, n in enumerate(nodes)],
                          signing_key)
        haproxy.start()
        yield Cluster(redis, nodes, haproxy)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes:
            node.stop()
        redis.stop()


def connections_per_node(cluster: Cluster) -> dict[str, int]:
    """Connections HAProxy has sent to each node so far (health checks not included)."""
    return {f"node-{i}": cluster.haproxy.sessions_total(f"node-{i}")
            for i in range(len(cluster.nodes))}


async def registry_view(cluster: Cluster) -> dict[str, str]:
    """Node id → state, as the registry holds them now."""
    registry = RedisRegistry(cluster.redis.url)
    try:
        views = node_views(await registry.read(), SETTINGS["registry_ttl_s"])
    finally:
        await registry.close()
    return {v.node_id: v.state for v in views}


# --- the shipped configuration ------------------------------------------------------------

def directives(text: str) -> dict[str, list[str]]:
    """Each section's directive lines, comments and blank lines dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not raw.startswith((" ", "\t")):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


VARYING = re.compile(r"^(bind |server |stats socket |default-server |maxconn )")
TIMING = re.compile(r"\b(inter|fastinter|downinter|fall|rise) \S+")


def test_shipped_config_and_its_test_twin_differ_only_where_deployments_do() -> None:
    shipped = directives(CONFIG.read_text())
    twin = directives(render(TEMPLATE.read_text(), STATS_SOCKET="/s", HTTP_PORT="1",
                             TLS_PORT="2", CERT_PEM="/c", SERVERS="server n 127.0.0.1:3"))
    assert set(shipped) == set(twin) == {"global", "defaults", "frontend rescue",
                                          "backend relays"}
    for section in shipped:
        assert [d for d in shipped[section] if not VARYING.match(d)] == \
            [d for d in twin[section] if not VARYING.match(d)], section
    [prod_default] = [d for d in shipped["backend relays"] if d.startswith("default-server")]
    [test_default] = [d for d in twin["backend relays"] if d.startswith("default-server")]
    assert TIMING.sub("", prod_default).split() == TIMING.sub("", test_default).split()
    backend = shipped["backend relays"]
    for needed in ("balance url_param session", "hash-type consistent", "http-reuse never",
                   "option http-server-close", "http-check expect status 200"):
        assert needed in backend
    assert "option redispatch" not in backend and not any(
        d.startswith("hash-balance-factor") for d in backend)
    assert "send-proxy-v2" in prod_default and "check-send-proxy" in prod_default
    assert "timeout tunnel 1h" in shipped["defaults"]
    log_format = next(d for d in shipped["defaults"] if d.startswith("log-format"))
    assert not re.search(r"%(r|HU|HQ|HP)\b", log_format), "the log would hold tokens"


def test_shipped_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed")
    bundle, _ = self_signed_certificate(tmp_path)
    text = CONFIG.read_text().replace("/etc/haproxy/certs/rescue.pem", str(bundle)) \
        .replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
    assert str(bundle) in text
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    result = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_fields_are_all_filled() -> None:
    with pytest.raises(KeyError):
        render(TEMPLATE.read_text(), HTTP_PORT="1")


# --- routing ---------------------------------------------------------------------------------

async def test_300_sessions_meet_on_one_node_and_spread_over_all_three(
        cluster: Cluster) -> None:
    before = connections_per_node(cluster)
    sids = [f"mh-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with unlimited_http() as http:

        async def pair(sid: str) -> tuple[TestPeer, TestPeer]:
            async with gate:  # host and participant on their own connections: they
                # exchange a frame each way only if HAProxy sent both to one node
                return await join_relaying_pair(http, cluster.haproxy, sid,
                                                 cluster.haproxy.mint(sid))

        pairs = await asyncio.gather(*(pair(sid) for sid in sids))
        try:
            after = connections_per_node(cluster)
            spread = {n: after[n] - before[n] for n in after}  # two per session
            assert sum(spread.values()) == 2 * SESSIONS, spread
            low, high = BALANCE_BOUND
            assert all(2 * low <= count <= 2 * high for count in spread.values()), spread
            for i, node in enumerate(cluster.nodes[:2]):  # single-worker nodes: /healthz
                status, body = await proxied_get(node.port, "/healthz",
                                                 format_v2(("127.0.0.1", 1)))
                assert status == 200 and isinstance(body, dict), body
                assert body["sessions"] >= spread[f"node-{i}"] // 2
            assert await registry_view(cluster) == {f"node-{i}": "active"
                                                    for i in range(NODES)}
        finally:
            await asyncio.gather(*(p.close() for pair_ in pairs for p in pair_))


async def test_one_session_over_tls_through_haproxy(cluster: Cluster) -> None:
    sid = f"tls-{uuid.uuid4().hex[:8]}"
    token = cluster.haproxy.mint(sid)
    async with aiohttp.ClientSession() as http:
        peers = []
        for role in ("host", "participant"):
            ws = await open_ws(http, cluster.haproxy.wss_url(sid, token),
                               ssl=cluster.haproxy.client_ssl())
            await ws.send_str(client_hello(sid, role, f"{role}-tls"))
            hello = await ws.receive_json(timeout=10)
            assert hello["type"] == "server_hello", hello
            peers.append(TestPeer(ws, sid, role, f"{role}-tls"))
        host, part = peers
        await host.send_frame(b"over tls")
        assert (await part.recv_frame()).payload == b"over tls"
        for peer in peers:
            await peer.close()
        # The certificate is what the client checked: without trusting it, no connection.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(cluster.haproxy.wss_url(sid, token).replace("/ws", "/healthz"))


# --- PROXY protocol at a node -------------------------------------------------------------

async def test_a_node_takes_the_client_address_from_the_proxy_header(
        cluster: Cluster) -> None:
    node = cluster.nodes[0]
    for header, client in ((format_v1(("203.0.113.7", 4242)), "203.0.113.7:4242"),
                           (format_v2(("2001:db8::9", 5353)), "2001:db8::9:5353"),
                           (format_v2(None), None), (format_v1(None), None)):
        status, body = await proxied_get(node.port, "/readyz", header)
        assert status == 200 and isinstance(body, dict) and body["status"] == "ok"
        if client is not None:
            await wait_for_log(node, "connection.proxied", client=client)


async def test_a_proxy_header_arriving_in_pieces_is_read_whole(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    request = format_v2(("198.51.100.23", 999)) + (
        b"GET /readyz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        for piece in (request[:5], request[5:20], request[20:]):  # split inside the header
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)  # let each piece arrive (and be peeked) on its own
        answer = await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    await wait_for_log(node, "connection.proxied", client="198.51.100.23:999")


@pytest.mark.parametrize("header", [None, b"PROXY TCP4 1.2.3.4\r\n", b"GARBAGE\r\n"])
async def test_a_node_refuses_a_connection_without_a_valid_proxy_header(
        cluster: Cluster, header: bytes | None) -> None:
    status, body = await proxied_get(cluster.nodes[1].port, "/readyz", header)
    assert status == 400 and isinstance(body, dict), body
    assert body["error"] == "bad_request" and "PROXY" in body["detail"]


# --- a node leaves --------------------------------------------------------------------------

async def test_sigterm_one_node_leaves_haproxy_first_and_no_session_fails(
        cluster: Cluster) -> None:
    """Runs last in this module: it stops one of the nodes."""
    sids = [f"mt-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    async with unlimited_http() as http:
        swarm = Swarm(ReconnectingPeer(http, cluster.haproxy, sid, role, f"{role}-{sid}",
                                       send_interval_s=1.0, give_up_s=WAIT_S)
                      for sid in sids for role in ("host", "participant"))
        await swarm.start(CONCURRENCY)
        try:
            await swarm.wait_all(lambda p: p.received >= 1, "exchanging", WAIT_S)
            victim_name = "node-1"
            victim = cluster.node(victim_name)

            loop = asyncio.get_running_loop()
            signalled_at = loop.time()
            victim.proc.send_signal(signal.SIGTERM)
            down_at = await cluster.haproxy.wait_status(victim_name, "DOWN", WAIT_S)
            # Out of the balancer while it still runs (its notice period): not-ready first.
            assert victim.proc.poll() is None, "the node exited before HAProxy noticed"
            assert (await registry_view(cluster)).get(victim_name) == "draining"
            routed_before = cluster.haproxy.sessions_total(victim_name)

            # New sessions while the victim drains: every one joins at the first attempt,
            # none reaches the victim.
            fresh = [f"mn-{i}-{uuid.uuid4().hex[:8]}" for i in range(30)]
            pairs = await asyncio.gather(*(join_relaying_pair(
                http, cluster.haproxy, sid, cluster.haproxy.mint(sid)) for sid in fresh))
            assert cluster.haproxy.sessions_total(victim_name) == routed_before
            for pair_ in pairs:
                for peer in pair_:
                    await peer.close()

            status = await wait_for_exit(victim, SETTINGS["drain_timeout_s"] + 5)
            exited_in = loop.time() - signalled_at
            assert status == 0
            assert exited_in < SETTINGS["drain_timeout_s"], exited_in
            await swarm.wait_all(lambda p: p.connected and p.received_since_connect >= 2,
                                 "exchanging after the node left", WAIT_S)
        finally:
            await swarm.stop()

    assert down_at - signalled_at < SETTINGS["drain_notice_s"], down_at - signalled_at
    assert victim.events("drain.completed") and not victim.events("drain.deadline")
    moved = [p for p in swarm.peers if p.connects > 1]
    for peer in swarm.peers:
        assert peer.ended is None, describe(peer)
        if peer.connects == 1:
            assert not peer.reconnects, describe(peer)
            continue
        # Told once, reconnected once, at the first attempt (HAProxy had already
        # taken the node out), to a node that kept its session together.
        assert peer.closes == [(1012, "SERVER_SHUTDOWN")], describe(peer)
        [reconnect] = peer.reconnects
        assert reconnect.succeeded and not reconnect.failed_attempts, describe(peer)
    # Both peers of a session moved together (and met again: they exchange frames), and
    # the stopped node had held its share of the sessions.
    by_session: dict[str, set[int]] = {}
    for peer in swarm.peers:
        by_session.setdefault(peer.session_id, set()).add(peer.connects)
    assert all(len(c) == 1 for c in by_session.values()), by_session
    low, high = BALANCE_BOUND
    assert low <= len(moved) // 2 <= high, len(moved)

    async def withdrawn() -> bool:
        return victim_name not in await registry_view(cluster)

    await wait_until(withdrawn, "the stopped node's registry entry to go", WAIT_S)
