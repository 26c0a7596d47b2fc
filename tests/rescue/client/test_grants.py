"""Token sources: a static token, and the control plane's token API (a real relay serving it)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from rescue.client.errors import FallbackPaused
from rescue.client.grants import (
    ControlPlaneError,
    ControlPlaneTokens,
    StaticToken,
    grant_from_response,
)
from tests.support.controlplane import call
from tests.support.relay import RelayProcess

SERVICE_KEY = "grants-service-key"
ADMIN_KEY = "grants-admin-key"


async def test_a_static_token_is_handed_out_unchanged() -> None:
    source = StaticToken("tok", relay_url="ws://r/ws")
    grant = await source.grant(fresh=True)
    assert (grant.token, grant.relay_url, grant.expires_at) == ("tok", "ws://r/ws", None)


def test_the_token_api_answer_is_read_fully() -> None:
    grant = grant_from_response({
        "token": "t", "expires_at": "2026-11-26T07:00:00Z", "relay_url": "ws://n1/ws",
        "guardrail": {"ratio": 0.01, "soft_breach": True}})
    assert grant.token == "t" and grant.relay_url == "ws://n1/ws" and grant.soft_breach
    assert grant.expires_at == pytest.approx(1795676400.0)


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": 5}])
def test_an_answer_without_a_token_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ControlPlaneError, match="no token"):
        grant_from_response(body)


@pytest.fixture
def control_plane(relay_factory: Any) -> RelayProcess:
    relay: RelayProcess = relay_factory(control_plane=True, service_keys=SERVICE_KEY,
                                        admin_key=ADMIN_KEY, pause_poll_s=0.2)
    return relay


async def test_tokens_are_fetched_cached_and_renewed(control_plane: RelayProcess,
                                                     http: Any) -> None:
    source = ControlPlaneTokens(control_plane.http_url(""), SERVICE_KEY, "grant-s1", http=http)
    first = await source.grant()
    assert first.relay_url and first.expires_at and first.expires_at > time.time() + 60
    assert await source.grant() is first  # cached while it has over 30 s to live
    fresh = await source.grant(fresh=True)
    assert fresh is not first


async def test_refusals_are_typed(control_plane: RelayProcess, http: Any) -> None:
    wrong = ControlPlaneTokens(control_plane.http_url(""), "not-the-key", "grant-s2", http=http)
    with pytest.raises(ControlPlaneError) as refused:
        await wrong.grant()
    assert (refused.value.status, refused.value.error) == (401, "unauthenticated")
    status, _, _ = await call(http, control_plane, "/admin/pause", {}, ADMIN_KEY)
    assert status == 200
    paused = ControlPlaneTokens(control_plane.http_url(""), SERVICE_KEY, "grant-s3", http=http)
    with pytest.raises(FallbackPaused):
        await paused.grant()
