"""Pairing: hosts and participants meet, exchange frames byte-exact, learn about each other.

Every test runs against a real relay process on 127.0.0.1. "Nothing arrives" is proved
by a later marker frame arriving first: the relay writes to each receiver in the order it
handles messages, so anything wrongly forwarded earlier would come before the marker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from typing import Any

import aiohttp

from rescue.frames import Kind, encode_frame
from tests.support.client import (
    RECEIVE_TIMEOUT_S,
    TestPeer,
    UnexpectedMessage,
    client_hello,
    join,
    join_peer,
    open_ws,
)
from tests.support.observe import admin_stats, free_port, wait_until
from tests.support.relay import RelayProcess

ADMIN_KEY = "pairing-admin-key"


def unique(prefix: str) -> str:
    """A session id no other test uses (the module's relay is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def joined(role: str, peer_id: str) -> dict[str, Any]:
    return {"type": "peer_joined", "role": role, "peer_id": peer_id}


def left(role: str, peer_id: str, reason: str) -> dict[str, Any]:
    return {"type": "peer_left", "role": role, "peer_id": peer_id, "reason": reason}


async def recv_binary(peer: TestPeer) -> bytes:
    """The next binary message's exact bytes (text events met on the way are kept)."""
    while True:
        msg = await peer.ws.receive(timeout=RECEIVE_TIMEOUT_S)
        if msg.type is aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type is aiohttp.WSMsgType.TEXT:
            peer.events.append(json.loads(msg.data))
            continue
        raise UnexpectedMessage(f"{peer.peer_id}: expected a frame, got {msg.type!r} "
                                f"{msg.data!r} {msg.extra!r}")


async def hello_refused(http: aiohttp.ClientSession, relay: RelayProcess, session_id: str,
                        role: str, peer_id: str) -> tuple[int, str]:
    """Send a valid hello; return the close (code, reason) the relay answers with instead."""
    ws = await open_ws(http, relay.ws_url(session_id, relay.mint(session_id)))
    try:
        await ws.send_str(client_hello(session_id, role, peer_id))
        msg = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
        assert msg.type is aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
        return int(msg.data), str(msg.extra)
    finally:
        await ws.close()


async def close_all(*peers: TestPeer) -> None:
    for peer in peers:
        await peer.close()


async def test_host_and_participant_exchange_frames(relay: RelayProcess,
                                                    http: aiohttp.ClientSession) -> None:
    host = await join(http, relay, "pair-1", "host", "h1")
    part = await join(http, relay, "pair-1", "participant", "p1")
    assert part.server_hello["peers"] == {"host": True, "participants": 0}
    assert await host.recv_event() == {"type": "peer_joined", "role": "participant",
                                       "peer_id": "p1"}
    payloads = [b"x", b"hello" * 100, bytes(range(256)) * 255 + bytes(255)]
    for p in payloads:
        await host.send_frame(p)
    for i, p in enumerate(payloads, start=1):
        frame = await part.recv_frame()
        assert (frame.kind, frame.seq, frame.payload) == (Kind.DATA, i, p)
    await part.send_frame(b"input")
    frame = await host.recv_frame()
    assert frame.payload == b"input"
    await part.close()
    assert await host.recv_event() == {"type": "peer_left", "role": "participant",
                                       "peer_id": "p1", "reason": "closed"}


async def test_host_and_several_participants_exchange_byte_exact_in_order(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("fan")
    host = await join(http, relay, sid, "host", "h")
    parts = [await join(http, relay, sid, "participant", f"p{i}") for i in range(3)]
    for p in parts:
        assert await host.recv_event() == joined("participant", p.peer_id)

    # Host -> every participant: empty, 1-byte, around the 7/16-bit length boundaries,
    # and the largest frame the size limit allows (8 + 65535 = 65543 <= 65544).
    payloads = [b"", b"\x00", b"\xff", bytes(125), bytes(126), os.urandom(4096),
                os.urandom(65535)]
    sent = [encode_frame(Kind.DATA, seq, p) for seq, p in enumerate(payloads, start=1)]
    assert len(sent[-1]) == 65543
    for data in sent:
        await host.send_raw(data)
    for p in parts:
        assert [await recv_binary(p) for _ in sent] == sent

    # Every participant -> the host, interleaved; each sender's frames stay in order.
    expected: dict[int, list[bytes]] = {}
    for i, _p in enumerate(parts):
        expected[i] = [encode_frame(Kind.DATA, i * 1000 + k, payload) for k, payload in
                       enumerate([b"", b"a", os.urandom(65535), os.urandom(300)])]
    for k in range(4):
        for i, p in enumerate(parts):
            await p.send_raw(expected[i][k])
    received: dict[int, list[bytes]] = {i: [] for i in expected}
    for _ in range(4 * len(parts)):
        data = await recv_binary(host)
        seq = int.from_bytes(data[4:8], "big")
        received[seq // 1000].append(data)
    assert received == expected  # also: none of the host's own frames came back

    # Nothing from one participant reached another, nothing was echoed: the host's
    # marker is the next frame every participant gets.
    marker = encode_frame(Kind.CONTROL, 999_999, b"marker")
    await host.send_raw(marker)
    for p in parts:
        assert await recv_binary(p) == marker
        # A participant hears about the host only, never about other participants.
        assert p.events == [joined("host", "h")]
    assert host.events == []
    await close_all(*parts, host)


async def test_control_close_and_ack_frames_are_forwarded_unchanged(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("kinds")
    host = await join(http, relay, sid, "host", "h")
    part = await join(http, relay, sid, "participant", "p")
    down = [encode_frame(Kind.CONTROL, 0, b"\x00ctl"),
            encode_frame(Kind.ACK, 7, (5).to_bytes(4, "big")),
            encode_frame(Kind.CLOSE, 0xFFFF_FFFF, b"bye")]
    up = [encode_frame(Kind.ACK, 1, (3).to_bytes(4, "big")),
          encode_frame(Kind.CONTROL, 2, b""),
          encode_frame(Kind.CLOSE, 3, b"\x01")]
    for data in down:
        await host.send_raw(data)
    assert [await recv_binary(part) for _ in down] == down
    for data in up:
        await part.send_raw(data)
    assert [await recv_binary(host) for _ in up] == up
    # The relay closed nobody after a close-kind frame: it is the peers' business.
    await host.send_frame(b"still here")
    assert (await part.recv_frame()).payload == b"still here"
    await close_all(part, host)


async def test_heartbeat_is_answered_to_its_sender_and_not_forwarded(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("hb")
    host = await join(http, relay, sid, "host", "h")
    part = await join(http, relay, sid, "participant", "p")
    host_hb = encode_frame(Kind.HEARTBEAT, 9, b"hb-from-host")
    await host.send_raw(host_hb)
    assert await recv_binary(host) == host_hb
    marker = encode_frame(Kind.DATA, 10, b"after heartbeat")
    await host.send_raw(marker)
    assert await recv_binary(part) == marker

    part_hb = encode_frame(Kind.HEARTBEAT, 0xFFFF_FFFF, b"")
    await part.send_raw(part_hb)
    assert await recv_binary(part) == part_hb
    marker = encode_frame(Kind.DATA, 1, b"participant marker")
    await part.send_raw(marker)
    assert await recv_binary(host) == marker
    await close_all(part, host)


async def test_late_participant_gets_later_frames_only(relay: RelayProcess,
                                                       http: aiohttp.ClientSession) -> None:
    sid = unique("late")
    host = await join(http, relay, sid, "host", "h")
    early = await join(http, relay, sid, "participant", "early")
    assert await host.recv_event() == joined("participant", "early")
    for payload in (b"one", b"two", b"three"):
        await host.send_frame(payload)
    assert [(await early.recv_frame()).payload for _ in range(3)] == [b"one", b"two", b"three"]

    late = await join(http, relay, sid, "participant", "late")
    assert late.server_hello["peers"] == {"host": True, "participants": 1}
    assert await host.recv_event() == joined("participant", "late")
    seq = await host.send_frame(b"four")
    frame = await late.recv_frame()
    assert (frame.seq, frame.payload) == (seq, b"four")
    assert (await early.recv_frame()).payload == b"four"
    assert late.events == [joined("host", "h")]
    await close_all(early, late, host)


async def test_peer_joined_and_peer_left_events(relay: RelayProcess,
                                                http: aiohttp.ClientSession) -> None:
    sid = unique("events")
    p1 = await join(http, relay, sid, "participant", "p1")
    p2 = await join(http, relay, sid, "participant", "p2")
    host = await join(http, relay, sid, "host", "h")
    # The newcomer host is told about everyone present; each participant about the host.
    assert sorted([await host.recv_event(), await host.recv_event()],
                  key=lambda e: e["peer_id"]) == [joined("participant", "p1"),
                                                  joined("participant", "p2")]
    assert await p1.recv_event() == joined("host", "h")
    assert await p2.recv_event() == joined("host", "h")

    await p1.close()
    assert await host.recv_event() == left("participant", "p1", "closed")
    await host.close()
    assert await p2.recv_event() == left("host", "h", "closed")
    # p2 heard nothing about p1 coming or going: the next thing it gets is a new host.
    host2 = await join(http, relay, sid, "host", "h2")
    assert await p2.recv_event() == joined("host", "h2")
    await close_all(p2, host2)


async def test_server_hello_fields(relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("hello")
    nonces = [base64.b64encode(os.urandom(16)).decode() for _ in range(4)]
    host = await join_peer(http, relay, sid, "host", "h", client_nonce=nonces[0])
    p1 = await join_peer(http, relay, sid, "participant", "p1", client_nonce=nonces[1])
    p2 = await join_peer(http, relay, sid, "participant", "p2", client_nonce=nonces[2])
    other = await join_peer(http, relay, unique("hello-other"), "host", "h",
                            client_nonce=nonces[3])
    peers = [host, p1, p2, other]
    for peer, nonce in zip(peers, nonces, strict=True):
        hello = peer.server_hello
        assert hello["type"] == "server_hello"
        assert hello["ack_nonce"] == nonce
        assert hello["protocol_version"] == 1
        assert hello["compression"] == "none"
        assert hello["heartbeat_s"] == relay.settings["heartbeat_s"]
        assert isinstance(hello["features"], list)
        assert len(base64.b64decode(hello["server_nonce"], validate=True)) == 16
        assert isinstance(hello["connection_id"], str) and hello["connection_id"]
    assert len({p.server_hello["connection_id"] for p in peers}) == len(peers)
    assert len({p.server_hello["server_nonce"] for p in peers}) == len(peers)
    assert host.server_hello["peers"] == {"host": False, "participants": 0}
    assert p1.server_hello["peers"] == {"host": True, "participants": 0}
    assert p2.server_hello["peers"] == {"host": True, "participants": 1}
    assert other.server_hello["peers"] == {"host": False, "participants": 0}
    await close_all(*peers)


async def test_same_peer_id_reconnecting_replaces_the_old_connection(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("replace")
    host = await join(http, relay, sid, "host", "h")
    old = await join(http, relay, sid, "participant", "p")
    assert await host.recv_event() == joined("participant", "p")

    new = await join(http, relay, sid, "participant", "p")
    assert new.server_hello["peers"] == {"host": True, "participants": 0}
    assert new.server_hello["connection_id"] != old.server_hello["connection_id"]
    assert await old.recv_close() == (4004, "REPLACED")
    assert await host.recv_event() == left("participant", "p", "replaced")
    assert await host.recv_event() == joined("participant", "p")

    await host.send_frame(b"to the new one")
    assert (await new.recv_frame()).payload == b"to the new one"
    await new.send_frame(b"from the new one")
    assert (await host.recv_frame()).payload == b"from the new one"

    # The host reconnecting under its own peer_id replaces itself the same way.
    host_again = await join(http, relay, sid, "host", "h")
    assert host_again.server_hello["peers"] == {"host": False, "participants": 1}
    assert await host.recv_close() == (4004, "REPLACED")
    assert await new.recv_event() == joined("host", "h")  # seen on joining
    assert await new.recv_event() == left("host", "h", "replaced")
    assert await new.recv_event() == joined("host", "h")
    await host_again.send_frame(b"host is back")
    assert (await new.recv_frame()).payload == b"host is back"
    assert host.events == [] and old.events == [joined("host", "h")]
    await close_all(new, host_again)


async def test_second_host_with_another_peer_id_replaces_the_first(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = unique("host2")
    first = await join(http, relay, sid, "host", "h1")
    part = await join(http, relay, sid, "participant", "p")
    assert await part.recv_event() == joined("host", "h1")
    assert await first.recv_event() == joined("participant", "p")

    second = await join(http, relay, sid, "host", "h2")
    assert second.server_hello["peers"] == {"host": False, "participants": 1}
    assert await first.recv_close() == (4004, "REPLACED")
    assert await part.recv_event() == left("host", "h1", "replaced")
    assert await part.recv_event() == joined("host", "h2")
    assert await second.recv_event() == joined("participant", "p")

    await second.send_frame(b"new host speaking")
    assert (await part.recv_frame()).payload == b"new host speaking"
    await part.send_frame(b"participant answers")
    assert (await second.recv_frame()).payload == b"participant answers"
    await close_all(part, second)


async def test_session_full_refuses_a_new_participant_but_not_a_reconnect(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(max_participants=2, heartbeat_s=5)
    sid = unique("full")
    host = await join(http, relay, sid, "host", "h")
    p1 = await join(http, relay, sid, "participant", "p1")
    p2 = await join(http, relay, sid, "participant", "p2")
    assert [await host.recv_event(), await host.recv_event()] == [
        joined("participant", "p1"), joined("participant", "p2")]

    assert await hello_refused(http, relay, sid, "participant", "p3") == (4003, "SESSION_FULL")

    p2_again = await join(http, relay, sid, "participant", "p2")
    assert p2_again.server_hello["peers"] == {"host": True, "participants": 1}
    assert await p2.recv_close() == (4004, "REPLACED")
    assert await host.recv_event() == left("participant", "p2", "replaced")
    assert await host.recv_event() == joined("participant", "p2")
    # The refused p3 never showed up for the host: the event above came straight after p2's.
    await host.send_frame(b"both of you")
    assert (await p1.recv_frame()).payload == b"both of you"
    assert (await p2_again.recv_frame()).payload == b"both of you"
    # The reconnect did not free a place: the session is still full.
    assert await hello_refused(http, relay, sid, "participant", "p4") == (4003, "SESSION_FULL")
    await close_all(p1, p2_again, host)


async def test_session_state_is_freed_after_the_grace_period(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    grace_s = 1.0
    # One worker: /debug/stats describes the worker answering it.
    relay = relay_factory(workers=1, admin_port=free_port(), admin_key=ADMIN_KEY, heartbeat_s=0.25,
                          session_grace_s=grace_s)
    sid = unique("grace")
    host = await join(http, relay, sid, "host", "h")
    part = await join(http, relay, sid, "participant", "p")
    stats = await admin_stats(http, relay, ADMIN_KEY, session=sid)
    assert stats["sessions"] == 1
    assert sorted((m["role"], m["connection_id"]) for m in stats["session"]["members"]) == [
        ("host", host.server_hello["connection_id"]),
        ("participant", part.server_hello["connection_id"])]

    await part.close()
    await host.close()
    loop = asyncio.get_running_loop()

    async def empty_but_kept() -> bool:
        body = await admin_stats(http, relay, ADMIN_KEY, session=sid)
        return body["session"] is not None and body["session"]["members"] == []

    await wait_until(empty_but_kept, "the session to be empty")
    emptied_at = loop.time()

    async def gone() -> bool:
        body = await admin_stats(http, relay, ADMIN_KEY, session=sid)
        return body["session"] is None

    await wait_until(gone, "the session to be dropped")
    # Kept for (about) the grace period, measured from when it was seen empty.
    assert loop.time() - emptied_at >= grace_s * 0.7
    stats = await admin_stats(http, relay, ADMIN_KEY)
    assert stats["sessions"] == 0
    assert stats["counters"]["sessions_expired"] == 1
    async with http.get(relay.http_url("/healthz")) as resp:
        assert (await resp.json())["sessions"] == 0
