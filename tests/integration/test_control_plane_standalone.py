"""A fleet in miniature: `beach-rescue control-plane` and a relay node sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.frames import Kind
from tests.support.client import join
from tests.support.controlplane import post_json
from tests.support.nodes import ControlPlaneProcess
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess

SERVICE_KEY = "fleet-service-key"
ADMIN_KEY = "fleet-admin-key"


@pytest.fixture
def control_plane(key_dir: Path, tmp_path: Path,
                  redis_server: RedisServer) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "cp-state", redis_url=redis_server.url,
                             service_keys=SERVICE_KEY, admin_key=ADMIN_KEY,
                             signing_keys=str(key_dir), relay_url="ws://relay.example/ws")
    yield cp
    assert cp.stop() == 0


async def test_tokens_from_the_standalone_control_plane_open_sessions_on_a_relay(
        control_plane: ControlPlaneProcess, relay_factory: Any, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(redis_url=redis_server.url, control_plane=False,
                                        pause_poll_s=0.2)
    status, _, body = await post_json(http, control_plane.url("/v1/sessions"), SERVICE_KEY,
                                      {"cohort_id": "fleet"})
    assert (status, body["sessions_this_hour"]) == (200, 1)
    tokens = []
    for _ in range(2):
        status, _, body = await post_json(http, control_plane.url("/v1/fallback/token"),
                                          SERVICE_KEY,
                                          {"session_id": "fleet-1", "cohort_id": "fleet"})
        assert status == 200, body
        assert body["relay_url"] == "ws://relay.example/ws"
        tokens.append(body["token"])
    # The shared Redis counted both fallbacks against the one session: 2/1 breaches.
    assert body["guardrail"] == {"ratio": 2.0, "soft_breach": True}

    host = await join(http, relay, "fleet-1", "host", "h", token=tokens[0])
    part = await join(http, relay, "fleet-1", "participant", "p", token=tokens[1])
    await host.send_frame(b"through the fleet")
    frame = await part.recv_frame()
    assert (frame.kind, frame.payload) == (Kind.DATA, b"through the fleet")
    # The relay does not serve the control plane's routes.
    async with http.post(relay.http_url("/v1/fallback/token")) as response:
        assert response.status == 404


async def test_pausing_at_the_control_plane_stops_new_connections_on_the_relay(
        control_plane: ControlPlaneProcess, relay_factory: Any, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    relay: RelayProcess = relay_factory(redis_url=redis_server.url, control_plane=False,
                                        pause_poll_s=0.2)
    status, _, body = await post_json(http, control_plane.url("/v1/admin/pause"), ADMIN_KEY)
    assert (status, body["paused"]) == (200, "soft")
    status, _, body = await post_json(http, control_plane.url("/v1/fallback/token"), SERVICE_KEY,
                                      {"session_id": "fleet-2"})
    assert (status, body["error"]) == (403, "fallback_paused")

    deadline = time.monotonic() + 5
    while True:  # the relay polls the switch every pause_poll_s; wait for that condition
        async with http.get(relay.http_url("/healthz")) as response:
            if (await response.json())["fallback_paused"] == "soft":
                break
        assert time.monotonic() < deadline, "the relay never saw the pause"
        await asyncio.sleep(0.05)
    async with http.get(relay.ws_url("fleet-2", relay.mint("fleet-2")),
                        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                 "Sec-WebSocket-Version": "13"}) as response:
        assert response.status == 403
        assert (await response.json())["error"] == "fallback_paused"

    status, _, body = await post_json(http, control_plane.url("/v1/admin/resume"), ADMIN_KEY)
    assert (status, body["paused"]) == (200, "off")
