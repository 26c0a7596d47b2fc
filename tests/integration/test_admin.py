"""The admin listener: off by default, never on the public port, behind a bearer key.

``/debug/stats`` answers JSON: 401 without the right key, 403 when no key is configured
(the listener refuses everything), 200 with the worker's counters and, with
``?session=``, one session's members.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.frames import Kind, encode_frame
from rescue.keys import SigningKey
from tests.support.client import join
from tests.support.observe import admin_get, free_port
from tests.support.relay import RelayProcess, start_relay

ADMIN_KEY = "admin-test-key-0123456789"


@pytest.fixture(scope="module")
def admin_relay(key_dir: Path, signing_key: SigningKey,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A one-worker relay with its admin listener on a free port, guarded by ADMIN_KEY.

    One worker, so that /debug/stats (which describes the worker answering it) sees the
    sessions the tests create.
    """
    proc = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("admin"),
                       workers=1, admin_port=free_port(), admin_key=ADMIN_KEY,
                       heartbeat_s=5)
    yield proc
    proc.stop()


def assert_json_error(status: int, body: Any, expected_status: int, error: str) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and body.get("error") == error, body
    assert isinstance(body.get("detail"), str) and body["detail"], body


async def test_admin_listener_is_off_by_default(relay: RelayProcess,
                                                http: aiohttp.ClientSession) -> None:
    assert relay.admin_port is None
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        async with http.get(relay.http_url("/debug/stats"), headers=headers) as resp:
            assert resp.content_type == "application/json"
            assert_json_error(resp.status, await resp.json(), 404, "not_found")


async def test_stats_are_not_served_on_the_public_port(admin_relay: RelayProcess,
                                                       http: aiohttp.ClientSession) -> None:
    assert admin_relay.admin_port not in (None, admin_relay.port)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(admin_relay.http_url("/debug/stats"), headers=headers) as resp:
        assert resp.content_type == "application/json"
        assert_json_error(resp.status, await resp.json(), 404, "not_found")


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer wrong-key",
    "Bearer " + ADMIN_KEY[:-1],
    "Bearer " + ADMIN_KEY + "x",
    "Bearer ",
    "Basic " + ADMIN_KEY,
    ADMIN_KEY,
])
async def test_stats_without_the_right_key_are_401(admin_relay: RelayProcess,
                                                   http: aiohttp.ClientSession,
                                                   authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    url = f"http://127.0.0.1:{admin_relay.admin_port}/debug/stats"
    async with http.get(url, headers=headers) as resp:
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert_json_error(resp.status, body, 401, "unauthenticated")
    assert "counters" not in body


async def test_stats_with_the_key_show_counters_and_a_session(
        admin_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    status, before = await admin_get(http, admin_relay, ADMIN_KEY)
    assert status == 200
    counters = before["counters"]
    for name in ("handshakes_ok", "messages_forwarded", "bytes_forwarded",
                 "heartbeats_answered", "flow_pauses", "slow_consumer_evictions",
                 "idle_closes", "sessions_expired"):
        assert isinstance(counters[name], int), name
    assert isinstance(counters["closes"], dict)
    assert isinstance(counters["upgrades_refused"], dict)

    sid = f"admin-{uuid.uuid4().hex[:10]}"
    # Traffic numbers are shown only for peers whose token carries "telemetry".
    telemetry = admin_relay.mint(sid, caps=["fallback-ws", "telemetry"])
    host = await join(http, admin_relay, sid, "host", "h", token=telemetry)
    part = await join(http, admin_relay, sid, "participant", "p", token=telemetry)
    frame = encode_frame(Kind.DATA, 1, b"counted")
    await host.send_raw(frame)
    assert (await part.recv_frame()).payload == b"counted"
    await part.send_frame(b"", Kind.HEARTBEAT)
    await part.recv_frame()

    status, after = await admin_get(http, admin_relay, ADMIN_KEY, session=sid)
    assert status == 200
    delta = {name: after["counters"][name] - counters[name]
             for name in ("handshakes_ok", "messages_forwarded", "bytes_forwarded",
                          "heartbeats_answered")}
    assert delta == {"handshakes_ok": 2, "messages_forwarded": 1,
                     "bytes_forwarded": len(frame), "heartbeats_answered": 1}
    assert after["peers"] >= 2 and after["sessions"] >= 1
    members = sorted(after["session"]["members"], key=lambda m: m["role"])
    assert [(m["role"], m["connection_id"]) for m in members] == [
        ("host", host.server_hello["connection_id"]),
        ("participant", part.server_hello["connection_id"])]
    host_member, part_member = members
    assert host_member["telemetry"] is True and part_member["telemetry"] is True
    # The host sent one frame; the participant was sent that frame (its heartbeat echo is
    # not relayed traffic and is not counted).
    assert (host_member["rx_msgs"], part_member["tx_msgs"]) == (1, 1)
    assert isinstance(after["session"]["age_s"], float | int)

    status, unknown = await admin_get(http, admin_relay, ADMIN_KEY,
                                      session="no-such-session")
    assert (status, unknown["session"]) == (200, None)
    await part.close()
    await host.close()


async def test_admin_port_without_a_key_refuses_everything(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(admin_port=free_port(), admin_key="")
    assert relay.admin_port
    for key in (None, "", "anything"):
        status, body = await admin_get(http, relay, key)
        assert_json_error(status, body, 403, "not_entitled")
        assert "counters" not in body


async def test_session_detail_shows_no_traffic_without_telemetry_opt_in(
        admin_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    sid = f"admin-{uuid.uuid4().hex[:10]}"
    host = await join(http, admin_relay, sid, "host", "h")  # token without "telemetry"
    part = await join(http, admin_relay, sid, "participant", "p",
                      token=admin_relay.mint(sid, caps=["fallback-ws", "telemetry"]))
    await host.send_frame(b"private")
    assert (await part.recv_frame()).payload == b"private"
    status, body = await admin_get(http, admin_relay, ADMIN_KEY, session=sid)
    assert status == 200
    members = {m["role"]: m for m in body["session"]["members"]}
    assert members["host"]["telemetry"] is False
    assert not {"rx_msgs", "rx_bytes", "tx_msgs", "tx_bytes"} & set(members["host"])
    assert members["participant"]["telemetry"] is True
    assert members["participant"]["tx_msgs"] == 1
    await part.close()
    await host.close()
