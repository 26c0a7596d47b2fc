"""A Redis outage under a relay that keeps its control-plane state there.

While Redis is down (SIGKILL) the token API answers 503 ``store_unavailable`` with
``Retry-After`` (or, with ``store_fail_open``, issues uncounted tokens), ``/v1/status``
reports the store unhealthy, and the relay itself keeps relaying: open sessions go on
and new peers still join. When Redis comes back on the same port the API recovers by
itself, within a bounded time, without a restart of the relay.

Every test asks for ``redis_server`` before ``relay_factory``: pytest tears fixtures down
in reverse order of setup, so the (restarted) Redis outlives the relays it serves and a
relay does not spend its shutdown on a dead store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.client import assert_relaying, join_relaying_pair
from tests.support.controlplane import call, fallback_token
from tests.support.observe import wait_until
from tests.support.probes import unique_session
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess

RelayFactory = Callable[..., RelayProcess]

SERVICE_KEY = "outage-service-key"
ADMIN_KEY = "outage-admin-key"
REDIS_TIMEOUT_S = 0.2
PAUSE_POLL_S = 0.3
OUTAGE_ANSWER_S = 3.0  # a refused request must not hang on the dead store
RECOVERY_S = 10.0
IO_TIMEOUT_S = 10.0
STATUS_SAMPLES = 6


def start(relay_factory: RelayFactory, key_dir: Path, redis_server: RedisServer,
          **extra: Any) -> RelayProcess:
    settings: dict[str, Any] = {
        "service_keys": SERVICE_KEY, "admin_key": ADMIN_KEY, "signing_keys": str(key_dir),
        "redis_url": redis_server.url, "redis_timeout_s": REDIS_TIMEOUT_S,
        "pause_poll_s": PAUSE_POLL_S}
    settings.update(extra)
    return relay_factory(**settings)


async def store_health(http: aiohttp.ClientSession, relay: RelayProcess) -> set[bool]:
    """``store_healthy`` of ``/v1/status`` over several fresh connections."""
    seen = set()
    for _ in range(STATUS_SAMPLES):
        async with http.get(relay.http_url("/v1/status"),
                            timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
            seen.add(bool((await resp.json())["store_healthy"]))
    return seen


@pytest.mark.parametrize("workers", [1, 2])
async def test_outage_refuses_tokens_keeps_relaying_and_recovers(
        redis_server: RedisServer, relay_factory: RelayFactory, key_dir: Path,
        fresh_http: aiohttp.ClientSession, workers: int) -> None:
    relay = start(relay_factory, key_dir, redis_server, workers=workers)
    http = fresh_http
    sid = unique_session("outage")
    token = (await fallback_token(http, relay, sid, SERVICE_KEY))["token"]
    host, part = await join_relaying_pair(http, relay, sid, token)
    assert await store_health(http, relay) == {True}

    redis_server.kill()
    started = time.monotonic()
    status, headers, body = await call(http, relay, "/fallback/token",
                                       {"session_id": unique_session("during")}, SERVICE_KEY)
    assert time.monotonic() - started < OUTAGE_ANSWER_S
    assert (status, body["error"]) == (503, "store_unavailable"), body
    assert int(headers["Retry-After"]) > 0
    status, headers, body = await call(http, relay, "/sessions", {"cohort_id": "public"},
                                       SERVICE_KEY)
    assert (status, body["error"]) == (503, "store_unavailable"), body
    assert int(headers["Retry-After"]) > 0
    status, _, body = await call(http, relay, "/admin/pause", {}, ADMIN_KEY)
    assert (status, body["error"]) == (503, "store_unavailable"), body

    # The relay does not need Redis: open sessions go on and new peers join.
    await assert_relaying(host, part)
    fresh = unique_session("fresh")
    new_host, new_part = await join_relaying_pair(http, relay, fresh, relay.mint(fresh))
    await wait_until(lambda: _health_is(http, relay, {False}), "store_healthy false",
                     within_s=RECOVERY_S)

    redis_server.restart()

    async def token_issued() -> bool:
        status, _, _ = await call(http, relay, "/fallback/token",
                                  {"session_id": unique_session("after")}, SERVICE_KEY)
        assert status in (200, 503), status
        return status == 200

    await wait_until(token_issued, "the token API to recover", within_s=RECOVERY_S)
    await wait_until(lambda: _health_is(http, relay, {True}), "store_healthy true",
                     within_s=RECOVERY_S)
    after = unique_session("after")
    body = await fallback_token(http, relay, after, SERVICE_KEY)
    assert isinstance(body["guardrail"]["ratio"], float)
    await join_relaying_pair(http, relay, after, body["token"])
    for a, b in ((host, part), (new_host, new_part)):
        await assert_relaying(a, b)


async def _health_is(http: aiohttp.ClientSession, relay: RelayProcess, want: set[bool]) -> bool:
    return await store_health(http, relay) == want


async def test_fail_open_issues_uncounted_tokens_during_the_outage(
        redis_server: RedisServer, relay_factory: RelayFactory, key_dir: Path,
        fresh_http: aiohttp.ClientSession) -> None:
    relay = start(relay_factory, key_dir, redis_server, workers=1, store_fail_open=True)
    http = fresh_http
    counted = await fallback_token(http, relay, unique_session("before"), SERVICE_KEY)
    assert counted["guardrail"] == {"ratio": 1.0, "soft_breach": True}

    redis_server.kill()
    sid = unique_session("open")
    body = await fallback_token(http, relay, sid, SERVICE_KEY)
    assert body["guardrail"]["uncounted"] is True
    assert body["guardrail"]["soft_breach"] is False
    host, part = await join_relaying_pair(http, relay, sid, body["token"])

    redis_server.restart()

    async def counted_again() -> bool:
        answer = await fallback_token(http, relay, unique_session("back"), SERVICE_KEY)
        guardrail = answer["guardrail"]
        return "uncounted" not in guardrail

    await wait_until(counted_again, "tokens to be counted again", within_s=RECOVERY_S)
    await assert_relaying(host, part)
