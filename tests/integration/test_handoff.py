"""Hand-off between workers: a connection that lands on the wrong worker is passed to the
slot that owns its session (rendezvous hash over slot ids), so the two peers of a session
always meet on one worker, whatever worker the kernel gave each connection to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rescue.ring import Ring
from tests.support.client import TestPeer, join
from tests.support.observe import admin_stats, free_port, wait_until
from tests.support.probes import RawWebSocket, upgrade_headers, ws_frame
from tests.support.reconnecting import unlimited_http
from tests.support.relay import RelayProcess

WORKERS = 4
SESSIONS = 200
ADMIN_KEY = "handoff-admin-key"
JOIN_CONCURRENCY = 50
IO_TIMEOUT_S = 10.0
STATS_TIMEOUT_S = 15.0
KEEPALIVE_TRIES = 24  # each lands on the owner with p = 1/4: (1/4)^24 to never see a 503


def sessions_owned_by(slot: int, count: int, slots: int = WORKERS) -> list[str]:
    """``count`` fresh session ids that ``Ring(range(slots))`` gives to ``slot``."""
    ring = Ring(range(slots))
    out: list[str] = []
    while len(out) < count:
        sid = f"own{slot}-{uuid.uuid4().hex[:12]}"
        if ring.owner(sid) == slot:
            out.append(sid)
    return out


def current_workers(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The cluster table's workers that are serving (the current generation)."""
    return [w for w in stats["workers"] if w.get("state") == "serving"]


async def pair_and_exchange(http: aiohttp.ClientSession, relay: RelayProcess,
                            sid: str) -> tuple[TestPeer, TestPeer]:
    """Host and participant of ``sid`` on separate connections, one frame each way."""
    host = await join(http, relay, sid, "host", f"h-{sid}")
    part = await join(http, relay, sid, "participant", f"p-{sid}")
    await host.send_frame(f"to-part {sid}".encode())
    assert (await part.recv_frame()).payload == f"to-part {sid}".encode()
    await part.send_frame(f"to-host {sid}".encode())
    assert (await host.recv_frame()).payload == f"to-host {sid}".encode()
    return host, part


async def test_sessions_pair_across_four_workers_on_their_owner_slots(
        relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=WORKERS, admin_port=free_port(),
                                        admin_key=ADMIN_KEY, heartbeat_s=15.0)
    sids = [f"handoff-{i}-{uuid.uuid4().hex[:8]}" for i in range(SESSIONS)]
    ring = Ring(range(WORKERS))
    expected = Counter(ring.owner(sid) for sid in sids)
    assert len(expected) == WORKERS, expected  # every slot owns some of them

    async with unlimited_http() as http:
        gate = asyncio.Semaphore(JOIN_CONCURRENCY)

        async def one(sid: str) -> tuple[TestPeer, TestPeer]:
            async with gate:
                return await pair_and_exchange(http, relay, sid)

        pairs = await asyncio.gather(*(one(sid) for sid in sids))
        try:
            seen: dict[str, Any] = {}

            async def table_settled() -> bool:
                stats = await admin_stats(http, relay, ADMIN_KEY)
                workers = current_workers(stats)
                seen["workers"] = workers
                if sorted(w["slot"] for w in workers) != list(range(WORKERS)):
                    return False
                by_slot = {w["slot"]: w for w in workers}
                accepted = sum(w["accepted"] for w in workers)
                return (accepted == 2 * SESSIONS
                        and all(by_slot[s]["sessions"] == expected[s] for s in range(WORKERS))
                        and sum(w["handed_off"] for w in workers)
                        == sum(w["adopted"] for w in workers))

            await wait_until(table_settled, "the workers' table to show every session on "
                             f"its owner slot (expected {dict(expected)})", STATS_TIMEOUT_S)
            workers = seen["workers"]
            handed_off = sum(w["handed_off"] for w in workers)
            assert handed_off > 0, workers
            assert handed_off == sum(w["adopted"] for w in workers), workers
            assert sum(w["handoff_failures"] for w in workers) == 0, workers
            assert {w["slot"]: w["sessions"] for w in workers} == dict(expected), workers
            # Each worker's sessions are whole: two peers each, none split across workers.
            assert all(w["peers"] == 2 * w["sessions"] for w in workers), workers
        finally:
            await asyncio.gather(*(p.close() for pair in pairs for p in pair))


# --- a kept-alive connection must not carry a foreign session -----------------------------


class KeptAlive:
    """One raw HTTP/1.1 connection that sends several requests in turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 port: int) -> None:
        self.reader = reader
        self.writer = writer
        self.port = port

    @classmethod
    async def open(cls, port: int) -> KeptAlive:
        """Connect to 127.0.0.1:``port``."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def request(self, target: str, headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        """Send ``GET target``; return (status, lower-cased headers, body)."""
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        async with asyncio.timeout(IO_TIMEOUT_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            parsed = {}
            for line in header_lines:
                if ":" in line:
                    name, _, value = line.partition(":")
                    parsed[name.strip().lower()] = value.strip()
            body = b""
            if status != 101:
                body = await self.reader.readexactly(int(parsed.get("content-length", "0")))
        return status, parsed, body

    async def at_eof(self) -> bool:
        """True once the server has closed the connection."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            return await self.reader.read(1) == b""

    async def aclose(self) -> None:
        """Close the connection and wait until it is closed."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class ForeignOutcome:
    """What kept-alive connections got when they asked for a session owned by ``owner``."""

    owner: int
    refused: tuple[int | None, dict[str, str], bytes, bool] | None  # status (None: closed
    # without an answer), headers, body, closed afterwards
    upgraded: list[RawWebSocket] = field(default_factory=list)  # landed on the owner


async def foreign_session_on_kept_alive(relay: RelayProcess, owner: int) -> ForeignOutcome:
    """Ask ``/healthz`` then upgrade for a session of ``owner`` on one kept-alive connection,
    on fresh connections until one lands on another slot (the upgrade is then refused)."""
    outcome = ForeignOutcome(owner, None)
    for sid in sessions_owned_by(owner, KEEPALIVE_TRIES):
        conn = await KeptAlive.open(relay.port)
        status, _headers, body = await conn.request("/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"
        try:
            answer = await conn.request(f"/ws?session={sid}&token={relay.mint(sid)}",
                                        upgrade_headers())
        except (asyncio.IncompleteReadError, ConnectionResetError):
            outcome.refused = (None, {}, b"", True)
            await conn.aclose()
            return outcome
        status, headers, body = answer
        if status != 101:
            outcome.refused = (status, headers, body, await conn.at_eof())
            await conn.aclose()
            return outcome
        # This connection landed on the owner slot and is served there (checked by the
        # callers from the workers' table). Join as the host and keep it open.
        ws = RawWebSocket(conn.reader, conn.writer)
        hello = json.dumps({"type": "client_hello", "session_id": sid, "role": "host",
                            "protocol_version": 1, "client_nonce": "AAAAAAAAAAAAAAAAAAAAAA==",
                            "compression": ["none"], "peer_id": "h"})
        await ws.send(ws_frame(0x1, hello.encode()))
        _fin, opcode, payload = await ws.read_frame()
        assert opcode == 0x1 and json.loads(payload)["type"] == "server_hello", payload
        outcome.upgraded.append(ws)
    return outcome


async def test_kept_alive_connection_never_serves_a_foreign_session(relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=WORKERS, admin_port=free_port(),
                                        admin_key=ADMIN_KEY, heartbeat_s=15.0)
    outcome = await foreign_session_on_kept_alive(relay, owner=0)
    try:
        assert outcome.refused is not None, (
            f"{KEEPALIVE_TRIES} kept-alive connections were all upgraded for sessions owned "
            "by one slot of four: foreign sessions are served on the wrong worker")
        # The sessions that were upgraded live on the owner slot, and only there.
        async with aiohttp.ClientSession() as http:
            async def on_owner() -> bool:
                workers = current_workers(await admin_stats(http, relay, ADMIN_KEY))
                return ({w["slot"]: w["sessions"] for w in workers}
                        == {s: (len(outcome.upgraded) if s == outcome.owner else 0)
                            for s in range(WORKERS)})

            await wait_until(on_owner, f"{len(outcome.upgraded)} sessions on slot "
                             f"{outcome.owner} only", STATS_TIMEOUT_S)
    finally:
        for ws in outcome.upgraded:
            await ws.aclose()


async def test_kept_alive_connection_gets_503_for_a_foreign_session(relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=WORKERS)
    outcome = await foreign_session_on_kept_alive(relay, owner=1)
    try:
        assert outcome.refused is not None, "never landed on a foreign slot"
        status, headers, body, closed = outcome.refused
        assert status == 503, f"expected 503 overloaded, got {status} {headers} {body!r}"
        error = json.loads(body)
        assert set(error) == {"error", "detail"} and error["error"] == "overloaded", error
        assert "retry-after" in headers, headers
        assert headers.get("connection", "").lower() == "close", headers
        assert closed, "the connection must be closed after the refusal"
    finally:
        for ws in outcome.upgraded:
            await ws.aclose()
