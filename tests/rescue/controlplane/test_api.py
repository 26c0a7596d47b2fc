"""The control-plane API end to end, through a real ``beach-rescue serve`` process.

Every status of protocol section 7: 200 with a token the relay accepts (its peers meet
and exchange a frame), 400, 401, 403, 429, and the guardrail numbers and log event. The
503 of a store outage is in ``tests/integration/test_redis_outage.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from rescue.controlplane.guardrail import COUNTER_TTL_S, counter_keys, hour_bucket
from rescue.controlplane.redis_store import PAUSE_KEY
from rescue.keys import SigningKey
from tests.support.client import join
from tests.support.observe import find_log, wait_for_log, wait_until
from tests.support.probes import Refused, assert_refusal, unique_session, upgrade_headers
from tests.support.redis import RedisServer
from tests.support.relay import RelayProcess, start_relay

RelayFactory = Callable[..., RelayProcess]

SERVICE_KEY = "svc-key-alpha"
OTHER_SERVICE_KEY = "svc-key-beta"
ADMIN_KEY = "admin-key-for-tests"
SESSION_MINTS_PER_MIN = 3
IO_TIMEOUT_S = 10.0
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

# Every token the shared relay minted, for the log check at the module's end.
_TOKENS: set[str] = set()


def control_settings(key_dir: Path, **extra: Any) -> dict[str, Any]:
    """Settings of a relay serving the control plane, signing with the relays' test key."""
    settings: dict[str, Any] = {
        "service_keys": f"{SERVICE_KEY}, {OTHER_SERVICE_KEY}", "admin_key": ADMIN_KEY,
        "signing_keys": str(key_dir), "pause_poll_s": 0.2, "log_level": "debug"}
    settings.update(extra)
    return settings


@pytest.fixture(scope="module")
def api_relay(key_dir: Path, signing_key: SigningKey,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay with the control plane shared by the tests that do not change its switch."""
    relay = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("api"),
                        **control_settings(key_dir,
                                           mint_rate_per_session_per_min=SESSION_MINTS_PER_MIN))
    yield relay
    relay.stop()
    for line in relay.lines:
        for token in _TOKENS:
            assert token.rsplit(".", 1)[-1] not in line, f"a minted token was logged: {line}"


async def call(http: aiohttp.ClientSession, relay: RelayProcess, path: str,
               body: Any = None, *, key: str | None = SERVICE_KEY, raw: bytes | None = None,
               method: str = "POST") -> tuple[int, dict[str, str], Any]:
    """Call ``/v1<path>`` with ``key`` as bearer; return (status, headers, JSON body)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with http.request(method, relay.http_url("/v1" + path), data=data, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        text = await resp.text()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, dict(resp.headers), parsed


async def get_token(http: aiohttp.ClientSession, relay: RelayProcess, session_id: str,
                    **fields: Any) -> dict[str, Any]:
    """A successful token response (asserting 200)."""
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": session_id, **fields})
    assert status == 200, body
    _TOKENS.add(body["token"])
    return dict(body)


def assert_error(status: int, body: Any, want_status: int, error: str) -> None:
    """Assert the contract's JSON error body with ``error`` and a non-empty detail."""
    assert status == want_status, body
    assert isinstance(body, dict), body
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == error, body
    assert isinstance(body["detail"], str) and body["detail"], body


def claims_of(token: str, signing_key: SigningKey) -> dict[str, Any]:
    """The token's claims, checking its EdDSA signature against the relays' test key."""
    claims: dict[str, Any] = jwt.decode(
        token, signing_key.private_key.public_key(), algorithms=["EdDSA"],
        audience="beach-rescue")
    return claims


async def exchange(http: aiohttp.ClientSession, relay: RelayProcess, session_id: str,
                   token: str) -> None:
    """Host and participant join with ``token`` and exchange one frame each way."""
    host = await join(http, relay, session_id, "host", f"h-{session_id}", token=token)
    part = await join(http, relay, session_id, "participant", f"p-{session_id}", token=token)
    try:
        await host.send_frame(b"from host")
        assert (await part.recv_frame()).payload == b"from host"
        await part.send_frame(b"from participant")
        assert (await host.recv_frame()).payload == b"from participant"
    finally:
        await part.close()
        await host.close()


async def upgrade_refused_paused(http: aiohttp.ClientSession, relay: RelayProcess) -> bool:
    """True when a WebSocket upgrade with a valid token is refused 403 fallback_paused.

    An upgrade that succeeds (101) is closed at once and reported as False.
    """
    sid = unique_session("paused")
    async with http.get(relay.ws_url(sid, relay.mint(sid)), headers=upgrade_headers(),
                        timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        if resp.status == 101:
            resp.close()  # drop the upgraded connection; never reuse it
            return False
        body = await resp.json()
        assert_refusal(Refused(resp.status, dict(resp.headers), resp.content_type, body),
                       403, "fallback_paused")
        return True


# --- 200: the token and what it carries ------------------------------------------------


async def test_token_round_trip_is_accepted_by_the_relay(
        api_relay: RelayProcess, http: aiohttp.ClientSession, signing_key: SigningKey) -> None:
    sid = unique_session("roundtrip")
    before = time.time()
    body = await get_token(http, api_relay, sid, cohort_id="beta", client_version="1.2.3")
    assert set(body) == {"token", "expires_at", "cohort", "relay_url", "guardrail"}
    assert body["cohort"] == "beta"
    assert body["relay_url"] == f"ws://127.0.0.1:{api_relay.port}/ws"
    claims = claims_of(body["token"], signing_key)
    assert claims["sid"] == sid
    assert claims["cohort"] == "beta"
    assert claims["cap"] == ["fallback-ws"]
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["nbf"] <= claims["iat"] + 1
    assert before - 1 <= claims["iat"] <= time.time() + 1
    assert RFC3339_UTC.match(body["expires_at"]), body["expires_at"]
    assert datetime.fromisoformat(body["expires_at"]).timestamp() == claims["exp"]
    await exchange(http, api_relay, sid, body["token"])


async def test_telemetry_cap_only_when_opted_in(api_relay: RelayProcess,
                                                http: aiohttp.ClientSession,
                                                signing_key: SigningKey) -> None:
    plain = await get_token(http, api_relay, unique_session("tel"))
    opted_out = await get_token(http, api_relay, unique_session("tel"), telemetry_opt_in=False)
    opted_in = await get_token(http, api_relay, unique_session("tel"), telemetry_opt_in=True)
    assert claims_of(plain["token"], signing_key)["cap"] == ["fallback-ws"]
    assert claims_of(opted_out["token"], signing_key)["cap"] == ["fallback-ws"]
    assert claims_of(opted_in["token"], signing_key)["cap"] == ["fallback-ws", "telemetry"]


async def test_every_configured_service_key_is_accepted(api_relay: RelayProcess,
                                                        http: aiohttp.ClientSession) -> None:
    for key in (SERVICE_KEY, OTHER_SERVICE_KEY):
        status, _, body = await call(http, api_relay, "/fallback/token",
                                     {"session_id": unique_session("keys")}, key=key)
        assert status == 200, body
        _TOKENS.add(body["token"])


async def test_sessions_endpoint_counts_per_cohort(api_relay: RelayProcess,
                                                   http: aiohttp.ClientSession) -> None:
    cohort = unique_session("cnt")
    for expected in (1, 2, 3):
        status, _, body = await call(http, api_relay, "/sessions", {"cohort_id": cohort})
        assert (status, body) == (200, {"cohort": cohort, "sessions_this_hour": expected})
    status, _, body = await call(http, api_relay, "/sessions",
                                 {"cohort_id": cohort, "session_id": "s-1"})
    assert (status, body["sessions_this_hour"]) == (200, 4)


# --- 401 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "wrong-key", SERVICE_KEY[:-1], SERVICE_KEY + "x",
                                 ADMIN_KEY, f"{SERVICE_KEY},{OTHER_SERVICE_KEY}"],
                         ids=["none", "empty", "wrong", "prefix", "longer", "admin-key",
                              "the-whole-list"])
async def test_token_without_a_valid_service_key_is_unauthenticated(
        api_relay: RelayProcess, http: aiohttp.ClientSession, key: str | None) -> None:
    status, _, body = await call(http, api_relay, "/fallback/token",
                                 {"session_id": "s-401"}, key=key)
    assert_error(status, body, 401, "unauthenticated")
    status, _, body = await call(http, api_relay, "/sessions", {}, key=key)
    assert_error(status, body, 401, "unauthenticated")


async def test_a_non_bearer_scheme_is_unauthenticated(api_relay: RelayProcess,
                                                      http: aiohttp.ClientSession) -> None:
    async with http.post(api_relay.http_url("/v1/fallback/token"),
                         json={"session_id": "s-basic"},
                         headers={"Authorization": f"Basic {SERVICE_KEY}"}) as resp:
        assert_error(resp.status, await resp.json(), 401, "unauthenticated")


@pytest.mark.parametrize("path", ["/admin/pause", "/admin/resume"])
@pytest.mark.parametrize("key", [None, SERVICE_KEY, "wrong"], ids=["none", "service", "wrong"])
async def test_admin_endpoints_need_the_admin_key(api_relay: RelayProcess,
                                                  http: aiohttp.ClientSession,
                                                  path: str, key: str | None) -> None:
    status, _, body = await call(http, api_relay, path, {}, key=key)
    assert_error(status, body, 401, "unauthenticated")
    status, _, body = await call(http, api_relay, "/status", method="GET", key=None)
    assert (status, body["paused"]) == (200, "off")


# --- 400 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "path"), [
    (b"{", None),
    (b"not json", None),
    (b"[]", None),
    (b"null", None),
    (b"{}", "session_id"),
    (b'{"session_id": 7}', "$.session_id"),
    (b'{"session_id": "s", "cohort_id": ["a"]}', "$.cohort_id"),
    (b'{"session_id": "s", "telemetry_opt_in": "yes"}', "$.telemetry_opt_in"),
    (b'{"session_id": "s", "entitlement_proof": 5}', "$.entitlement_proof"),
    (b'{"session_id": "s", "client_version": {}}', "$.client_version"),
], ids=["truncated", "not-json", "array", "null", "no-session", "int-session", "list-cohort",
        "string-bool", "int-proof", "object-version"])
async def test_malformed_body_is_invalid_request_naming_the_field(
        api_relay: RelayProcess, http: aiohttp.ClientSession, raw: bytes,
        path: str | None) -> None:
    status, _, body = await call(http, api_relay, "/fallback/token", raw=raw)
    assert_error(status, body, 400, "invalid_request")
    if path is not None:
        assert path in body["detail"], body


@pytest.mark.parametrize("session_id", ["", "a b", "x" * 129, "semi;colon", "ümlaut", "a/b"],
                         ids=["empty", "space", "too-long", "semicolon", "non-ascii", "slash"])
async def test_bad_session_id_is_invalid_session_id(api_relay: RelayProcess,
                                                    http: aiohttp.ClientSession,
                                                    session_id: str) -> None:
    status, _, body = await call(http, api_relay, "/fallback/token", {"session_id": session_id})
    assert_error(status, body, 400, "invalid_session_id")
    status, _, body = await call(http, api_relay, "/sessions", {"session_id": session_id})
    assert_error(status, body, 400, "invalid_session_id")


@pytest.mark.parametrize("cohort", ["", "a b", "c" * 65], ids=["empty", "space", "too-long"])
async def test_bad_cohort_is_invalid_request(api_relay: RelayProcess,
                                             http: aiohttp.ClientSession, cohort: str) -> None:
    status, _, body = await call(http, api_relay, "/fallback/token",
                                 {"session_id": "s-cohort", "cohort_id": cohort})
    assert_error(status, body, 400, "invalid_request")
    assert "cohort_id" in body["detail"]


# --- 429 ----------------------------------------------------------------------------------


async def test_tokens_per_session_are_rate_limited(api_relay: RelayProcess,
                                                   http: aiohttp.ClientSession) -> None:
    sid = unique_session("rl")
    for _ in range(SESSION_MINTS_PER_MIN):
        await get_token(http, api_relay, sid)
    status, headers, body = await call(http, api_relay, "/fallback/token", {"session_id": sid})
    assert_error(status, body, 429, "rate_limited")
    assert int(headers["Retry-After"]) > 0
    await get_token(http, api_relay, unique_session("rl-other"))  # other sessions unaffected


async def test_requests_per_service_key_are_rate_limited(
        relay_factory: RelayFactory, key_dir: Path, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, mint_rate_per_service_key_per_s=0.5))
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": unique_session("k1")})
    assert status == 200, body
    status, headers, body = await call(http, relay, "/fallback/token",
                                       {"session_id": unique_session("k2")})
    assert_error(status, body, 429, "rate_limited")
    assert int(headers["Retry-After"]) > 0
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": unique_session("k3")}, key=OTHER_SERVICE_KEY)
    assert status == 200, body  # each key has its own budget


# --- the guardrail ------------------------------------------------------------------------


async def count_sessions(http: aiohttp.ClientSession, relay: RelayProcess, cohort: str,
                         n: int) -> int:
    """POST ``n`` sessions in ``cohort`` (50 at a time); return the highest count answered."""
    gate = asyncio.Semaphore(50)

    async def one() -> int:
        async with gate:
            status, _, body = await call(http, relay, "/sessions", {"cohort_id": cohort})
            assert status == 200, body
            return int(body["sessions_this_hour"])

    return max(await asyncio.gather(*(one() for _ in range(n))))


async def log_barrier(http: aiohttp.ClientSession, relay: RelayProcess) -> None:
    """Wait until the worker has logged everything it did before this call.

    A refused request logs ``token_api.refused``; the worker writes its log lines in
    order, so once this one is seen the earlier ones are in too.
    """
    before = len(find_log(relay, "token_api.refused", error="invalid_session_id"))
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": "log barrier"})
    assert_error(status, body, 400, "invalid_session_id")

    async def logged() -> bool:
        return len(find_log(relay, "token_api.refused", error="invalid_session_id")) > before

    await wait_until(logged, "the barrier's log line")


async def test_guardrail_ratio_and_one_soft_breach_event_per_cohort_hour(
        api_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    cohort = unique_session("gr")
    started_hour = hour_bucket(time.time())
    assert await count_sessions(http, api_relay, cohort, 1000) == 1000
    first = await get_token(http, api_relay, unique_session("gr"), cohort_id=cohort)
    assert first["guardrail"] == {"ratio": 0.001, "soft_breach": False}
    ratios = []
    for _ in range(3):
        body = await get_token(http, api_relay, unique_session("gr"), cohort_id=cohort)
        assert body["guardrail"]["soft_breach"] is False, body
        ratios.append(body["guardrail"]["ratio"])
    assert ratios == [0.002, 0.003, 0.004]
    for expected in (0.005, 0.006, 0.007):  # at the threshold and over it: still issued
        body = await get_token(http, api_relay, unique_session("gr"), cohort_id=cohort)
        assert body["guardrail"] == {"ratio": expected, "soft_breach": True}
    if hour_bucket(time.time()) != started_hour:
        pytest.skip("the test crossed an hour boundary; its counts were split")
    record = await wait_for_log(api_relay, "guardrail_soft_breach", cohort=cohort)
    assert record["level"] == "warning"
    assert (record["fallback"], record["total"]) == (5, 1000)
    await log_barrier(http, api_relay)
    assert len(find_log(api_relay, "guardrail_soft_breach", cohort=cohort)) == 1


async def test_guardrail_with_no_session_counted_is_a_breach(
        api_relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    body = await get_token(http, api_relay, unique_session("nosess"),
                           cohort_id=unique_session("empty"))
    assert body["guardrail"] == {"ratio": 1.0, "soft_breach": True}


async def test_hard_threshold_pauses_the_fallback_by_itself(
        relay_factory: RelayFactory, key_dir: Path, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, guardrail_threshold=0.1,
                                             guardrail_hard_threshold=0.5,
                                             guardrail_hard_min_sessions=4))
    # A cohort below the minimum sample cannot trip the hard threshold (it breaches softly).
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": "tiny-1", "cohort_id": "tiny"})
    assert status == 200 and body["guardrail"]["soft_breach"] is True, body
    assert await count_sessions(http, relay, "hard", 4) == 4
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": "hard-1", "cohort_id": "hard"})
    assert status == 200, body
    assert body["guardrail"] == {"ratio": 0.25, "soft_breach": True}
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": "hard-2", "cohort_id": "hard"})
    assert_error(status, body, 403, "fallback_paused")
    await wait_for_log(relay, "guardrail_auto_paused", cohort="hard")
    # The switch is global: other cohorts and new connections stop too.
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": "other-1", "cohort_id": "public"})
    assert_error(status, body, 403, "fallback_paused")
    status, _, body = await call(http, relay, "/status", method="GET", key=None)
    assert body["paused"] == "soft"
    await wait_until(lambda: upgrade_refused_paused(http, relay), "upgrades refused")
    status, _, body = await call(http, relay, "/admin/resume", {}, key=ADMIN_KEY)
    assert (status, body["paused"]) == (200, "off")
    assert await count_sessions(http, relay, "calm", 10) == 10
    status, _, body = await call(http, relay, "/fallback/token",
                                 {"session_id": "other-2", "cohort_id": "calm"})
    assert status == 200, body
    assert body["guardrail"] == {"ratio": 0.1, "soft_breach": True}


# --- 403 fallback_paused --------------------------------------------------------------------


async def test_admin_pause_refuses_tokens_and_upgrades_until_resume(
        relay_factory: RelayFactory, key_dir: Path, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir))
    status, _, body = await call(http, relay, "/admin/pause", {}, key=ADMIN_KEY)
    assert (status, body) == (200, {"paused": "soft", "forced_by_config": False})
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": "p-1"})
    assert_error(status, body, 403, "fallback_paused")
    status, _, body = await call(http, relay, "/status", method="GET", key=None)
    assert (status, body["paused"], body["store_healthy"]) == (200, "soft", True)
    await wait_until(lambda: upgrade_refused_paused(http, relay), "upgrades refused")

    status, _, body = await call(http, relay, "/admin/pause", {"hard": True}, key=ADMIN_KEY)
    assert (status, body["paused"]) == (200, "hard")
    status, _, body = await call(http, relay, "/admin/pause", {"hard": "yes"}, key=ADMIN_KEY)
    assert_error(status, body, 400, "invalid_request")

    status, _, body = await call(http, relay, "/admin/resume", {}, key=ADMIN_KEY)
    assert (status, body["paused"]) == (200, "off")
    sid = unique_session("resumed")
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": sid})
    assert status == 200, body

    async def upgrade_accepted() -> bool:
        return not await upgrade_refused_paused(http, relay)

    await wait_until(upgrade_accepted, "upgrades accepted again")
    await exchange(http, relay, sid, body["token"])


async def test_fallback_paused_config_forces_the_switch_on(
        relay_factory: RelayFactory, key_dir: Path, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, fallback_paused=True))
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": "f-1"})
    assert_error(status, body, 403, "fallback_paused")
    assert await upgrade_refused_paused(http, relay)
    status, _, body = await call(http, relay, "/admin/resume", {}, key=ADMIN_KEY)
    assert (status, body) == (200, {"paused": "soft", "forced_by_config": True})
    status, _, body = await call(http, relay, "/fallback/token", {"session_id": "f-2"})
    assert_error(status, body, 403, "fallback_paused")
    status, _, body = await call(http, relay, "/status", method="GET", key=None)
    assert (body["paused"], body["forced_by_config"]) == ("soft", True)
    async with http.get(relay.http_url("/healthz")) as resp:
        assert (await resp.json())["fallback_paused"] == "soft"


# --- entitlement proofs ---------------------------------------------------------------------


class IdentityProvider:
    """Signing keys of a test identity provider and its JWKS file."""

    def __init__(self, directory: Path) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.ec = ec.generate_private_key(ec.SECP256R1())
        ed_jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True)
        ec_jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        ed_jwk["kid"], ec_jwk["kid"] = "idp-ed", "idp-ec"
        self.jwks = directory / "jwks.json"
        self.jwks.write_text(json.dumps({"keys": [ed_jwk, ec_jwk]}))

    def proof(self, *, ttl_s: int = 600, entitled: bool = True, kid: str = "idp-ed",
              alg: str = "EdDSA", key: Any = None) -> str:
        """A proof for user-1, granting ``rescue:fallback`` unless ``entitled`` is False."""
        now = int(time.time())
        claims: dict[str, Any] = {"sub": "user-1", "iat": now - 10, "exp": now + ttl_s}
        if entitled:
            claims["entitlements"] = ["rescue:fallback"]
        return jwt.encode(claims, self.ed if key is None else key, algorithm=alg,
                          headers={"kid": kid})


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> IdentityProvider:
    return IdentityProvider(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def entitled_relay(key_dir: Path, signing_key: SigningKey, idp: IdentityProvider,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    relay = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("entitled"),
                        **control_settings(key_dir, entitlement_jwks=str(idp.jwks)))
    yield relay
    relay.stop()


async def test_entitled_proof_gets_a_token(entitled_relay: RelayProcess,
                                           http: aiohttp.ClientSession,
                                           idp: IdentityProvider) -> None:
    sid = unique_session("ent")
    first = await get_token(http, entitled_relay, sid, entitlement_proof=idp.proof())
    ec_proof = idp.proof(kid="idp-ec", alg="ES256", key=idp.ec)
    status, _, body = await call(http, entitled_relay, "/fallback/token",
                                 {"session_id": unique_session("ent"),
                                  "entitlement_proof": ec_proof})
    assert status == 200, body
    await exchange(http, entitled_relay, sid, first["token"])


@pytest.mark.parametrize("proof", ["absent", "null", "empty", "not-entitled"])
async def test_missing_entitlement_is_403(entitled_relay: RelayProcess,
                                          http: aiohttp.ClientSession, idp: IdentityProvider,
                                          proof: str) -> None:
    body: dict[str, Any] = {"session_id": unique_session("noent")}
    if proof != "absent":
        body["entitlement_proof"] = {"null": None, "empty": "",
                                     "not-entitled": idp.proof(entitled=False)}[proof]
    status, _, answer = await call(http, entitled_relay, "/fallback/token", body)
    assert_error(status, answer, 403, "entitlement_missing")


@pytest.mark.parametrize("proof", [
    "expired", "garbage", "unknown-kid", "foreign-key", "hs256",
    "alg-mismatch",
])
async def test_invalid_proof_is_401(entitled_relay: RelayProcess, http: aiohttp.ClientSession,
                                    idp: IdentityProvider, proof: str) -> None:
    makers: dict[str, Callable[[], str]] = {
        "expired": lambda: idp.proof(ttl_s=-3600),
        "garbage": lambda: "not-a-jwt",
        "unknown-kid": lambda: idp.proof(kid="idp-retired"),
        "foreign-key": lambda: idp.proof(key=ed25519.Ed25519PrivateKey.generate()),
        "hs256": lambda: idp.proof(alg="HS256", key=b"s" * 64),
        "alg-mismatch": lambda: idp.proof(alg="ES256", key=idp.ec, kid="idp-ed"),
    }
    token = makers[proof]()
    status, _, body = await call(http, entitled_relay, "/fallback/token",
                                 {"session_id": unique_session("bad"),
                                  "entitlement_proof": token})
    assert_error(status, body, 401, "entitlement_invalid")


async def test_disable_oidc_skips_the_entitlement_check(
        relay_factory: RelayFactory, key_dir: Path, idp: IdentityProvider,
        http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, entitlement_jwks=str(idp.jwks),
                                             disable_oidc=True))
    for proof in (None, "not-a-jwt", idp.proof(entitled=False)):
        sid = unique_session("oidc-off")
        status, _, body = await call(http, relay, "/fallback/token",
                                     {"session_id": sid, "entitlement_proof": proof})
        assert status == 200, body
    await exchange(http, relay, sid, body["token"])


def run_serve(key_dir: Path, state_dir: Path, **settings: Any) -> subprocess.CompletedProcess[str]:
    """Run ``beach-rescue serve`` expecting it to refuse to start; return its outcome."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    env["BEACH_RESCUE_STATE_DIR"] = str(state_dir)
    for name, value in settings.items():
        env["BEACH_RESCUE_" + name.upper()] = (str(value).lower() if isinstance(value, bool)
                                               else str(value))
    return subprocess.run(
        [sys.executable, "-m", "rescue", "serve", "--host", "127.0.0.1", "--port", "0",
         "--workers", "1", "--token-keys", str(key_dir)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        check=False)


def test_production_refuses_disable_oidc_at_start(key_dir: Path, tmp_path: Path) -> None:
    result = run_serve(key_dir, tmp_path, production=True, disable_oidc=True,
                       signing_keys=str(key_dir), service_keys=SERVICE_KEY)
    assert result.returncode == 2, result
    assert "`disable_oidc`" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [
    pytest.param(None, id="missing-file"),
    pytest.param("{not json", id="not-json"),
    pytest.param('{"keys": []}', id="no-keys"),
])
def test_unusable_jwks_refuses_to_start(key_dir: Path, tmp_path: Path,
                                        content: str | None) -> None:
    jwks = tmp_path / "jwks.json"
    if content is not None:
        jwks.write_text(content)
    result = run_serve(key_dir, tmp_path, signing_keys=str(key_dir), entitlement_jwks=str(jwks))
    assert result.returncode != 0, result
    assert "entitlement_jwks" in result.stderr
    assert "Traceback" not in result.stderr


# --- with Redis -------------------------------------------------------------------------------


async def test_redis_backed_api_counts_in_redis_and_reads_its_switch(
        relay_factory: RelayFactory, key_dir: Path, redis_server: RedisServer,
        http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, redis_url=redis_server.url))
    raw = aioredis.Redis.from_url(redis_server.url, socket_timeout=2.0)
    try:
        cohort = unique_session("rc")
        assert await count_sessions(http, relay, cohort, 200) == 200
        sid = unique_session("redis")
        body = await get_token(http, relay, sid, cohort_id=cohort)
        assert body["guardrail"] == {"ratio": 0.005, "soft_breach": True}
        await exchange(http, relay, sid, body["token"])
        fallback_key, total_key = counter_keys(cohort, time.time())
        assert (await raw.get(fallback_key), await raw.get(total_key)) == (b"1", b"200")
        for key in (fallback_key, total_key):
            assert 0 < await raw.ttl(key) <= COUNTER_TTL_S

        status, _, answer = await call(http, relay, "/admin/pause", {"hard": True},
                                       key=ADMIN_KEY)
        assert (status, answer["paused"]) == (200, "hard")
        assert await raw.get(PAUSE_KEY) == b"hard"
        await raw.delete(PAUSE_KEY)  # another node resumed: this one follows

        async def resumed() -> bool:
            _, _, state = await call(http, relay, "/status", method="GET", key=None)
            return bool(state["paused"] == "off")

        await wait_until(resumed, "the relay to read the switch from Redis")
        await raw.set(PAUSE_KEY, "soft")  # another node paused
        await wait_until(lambda: upgrade_refused_paused(http, relay), "upgrades refused")
    finally:
        await raw.aclose()


async def test_exempt_cohorts_get_tokens_without_touching_the_guardrail(
        relay_factory: RelayFactory, key_dir: Path, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(**control_settings(key_dir, guardrail_threshold=0.1,
                                             guardrail_hard_threshold=0.5,
                                             guardrail_hard_min_sessions=1))
    for n in range(3):
        status, _, body = await call(http, relay, "/fallback/token",
                                     {"session_id": f"probe-{n}", "cohort_id": "probe"})
        assert status == 200, body
        assert body["guardrail"] == {"ratio": None, "soft_breach": False, "exempt": True}
    status, _, body = await call(http, relay, "/status", method="GET", key=None)
    assert body["paused"] == "off"
