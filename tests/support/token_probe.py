"""Asking the control plane for a token at a steady pace, to see its outages and returns.

Each probe is one ``POST /v1/fallback/token`` for a fresh session over a fresh TCP
connection (so it may reach any worker of the node), recorded with its loop time, its
status and error code, and how long the answer took. A request that loses its
connection (the worker serving it was killed) is retried once at once and recorded as
what the retry got.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import aiohttp

from tests.support.relay import RelayProcess

PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class TokenProbe:
    """One answer of the token API (status 0: no answer at all)."""

    at: float  # loop time the request was sent
    status: int
    error: str  # the JSON error code, or the exception for status 0
    took_s: float


async def _ask(http: aiohttp.ClientSession, relay: RelayProcess, key: str) -> tuple[int, str]:
    body = {"session_id": f"probe-{uuid.uuid4().hex[:12]}"}
    async with http.post(relay.http_url("/v1/fallback/token"), json=body,
                         headers={"Authorization": f"Bearer {key}"},
                         timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
        answer = await resp.json(content_type=None)
        error = str(answer.get("error", "")) if isinstance(answer, dict) else "not json"
        return resp.status, error


async def probe_once(http: aiohttp.ClientSession, relay: RelayProcess, key: str) -> TokenProbe:
    """One probe (retried once on a lost connection)."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    for attempt in range(2):
        try:
            status, error = await _ask(http, relay, key)
            break
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            status, error = 0, f"{type(e).__name__}: {e}"
            if attempt == 1:
                break
    return TokenProbe(sent, status, error, loop.time() - sent)


async def probe_tokens(relay: RelayProcess, key: str, interval_s: float,
                       out: list[TokenProbe]) -> None:
    """Probe every ``interval_s`` until cancelled, appending to ``out``."""
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as http:
        while True:
            out.append(await probe_once(http, relay, key))
            await asyncio.sleep(interval_s)  # the probing pace
