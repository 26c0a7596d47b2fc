"""Calling the control-plane HTTP API (``/v1/...``) of a relay or a standalone control plane."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.support.relay import RelayProcess

IO_TIMEOUT_S = 10.0


async def post_json(http: aiohttp.ClientSession, url: str, key: str,
                    body: Any = None) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` (``{}`` when None) as JSON to ``url`` with ``key`` as bearer; return
    (status, headers, JSON body). An answer that is not JSON fails the calling test."""
    async with http.post(url, json={} if body is None else body,
                         headers={"Authorization": f"Bearer {key}"},
                         timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def call(http: aiohttp.ClientSession, relay: RelayProcess, path: str, body: Any,
               key: str) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to the relay's ``/v1<path>`` with ``key`` as bearer; return (status,
    headers, JSON body)."""
    return await post_json(http, relay.http_url("/v1" + path), key, body)


async def fallback_token(http: aiohttp.ClientSession, relay: RelayProcess, session_id: str,
                         key: str) -> dict[str, Any]:
    """The answer of ``/v1/fallback/token`` for ``session_id`` (with ``key`` as bearer),
    asserting that it is a 200."""
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": session_id}, key)
    assert status == 200, body
    return dict(body)
