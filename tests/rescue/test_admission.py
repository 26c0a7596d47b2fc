"""Tests for rescue.admission: refusals before the upgrade, their order, and token lookup."""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rescue.admission import Load, UpgradeRequest, admit, bearer_token
from rescue.codes import ErrorCode, Refusal
from rescue.keys import SigningKey
from rescue.tokens import TokenClaims, TokenVerifier, mint_token

NOW = 1_700_000_000.0
SID = "session-1"

CLAIMS = TokenClaims(sid=SID, iat=0, nbf=0, exp=300, aud="beach-rescue", iss="cp",
                     cohort="public", cap=("fallback-ws",), kid="k")


class RecordingVerifier:
    """Stands in for TokenVerifier where only whether (and with what) it is called matters."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def verify(self, token: str, session_id: str, now: float) -> TokenClaims:
        self.calls.append((token, session_id, now))
        return CLAIMS


def request(**changes: object) -> UpgradeRequest:
    base = UpgradeRequest(session=SID, query_token="tok", authorization=None,
                          is_websocket_upgrade=True)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def load(**changes: object) -> Load:
    base = Load(draining=False, paused=False, connections=0, handshakes=0,
                max_connections=100, max_handshakes=10)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def refuse(req: UpgradeRequest, ld: Load, verifier: object | None = None) -> Refusal:
    stub = verifier if verifier is not None else RecordingVerifier()
    with pytest.raises(Refusal) as info:
        admit(req, ld, cast(TokenVerifier, stub), NOW)
    return info.value


# --- bearer_token -------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer abc", "abc"),
    ("BEARER abc", "abc"),
    ("BeArEr abc", "abc"),
    ("  Bearer   abc  ", "abc"),
])
def test_bearer_token_accepts_the_scheme_in_any_case(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [
    None, "", "   ", "Bearer", "Bearer ", "Bearer    ", "Bearerabc", "Basic dXNlcjpwYXNz",
    "Token abc", "abc",
])
def test_bearer_token_refuses_other_headers(header: str | None) -> None:
    assert bearer_token(header) is None


# --- each refusal -------------------------------------------------------------------------

def test_admits_a_good_request_and_passes_token_session_and_clock_to_the_verifier() -> None:
    verifier = RecordingVerifier()
    assert admit(request(), load(), cast(TokenVerifier, verifier), NOW) is CLAIMS
    assert verifier.calls == [("tok", SID, NOW)]


def test_draining_is_refused_with_503_and_retry_after() -> None:
    r = refuse(request(), load(draining=True))
    assert r.error is ErrorCode.DRAINING
    assert (r.error.status, r.error.code) == (503, "draining")
    assert r.retry_after_s is not None and r.retry_after_s > 0


@pytest.mark.parametrize("session", [
    None, "", "a" * 129, "has space", "slash/es", "ünïcode", "semi;colon", "new\nline",
    "trailing\n", "%41",
])
def test_missing_or_invalid_session_is_a_bad_request(session: str | None) -> None:
    r = refuse(request(session=session), load())
    assert r.error is ErrorCode.BAD_REQUEST
    assert r.error.status == 400
    assert "session" in r.detail
    assert r.retry_after_s is None


@pytest.mark.parametrize("session", ["a", "a" * 128, "A-Z.a_z-0.9", "...", "-_-"])
def test_valid_session_ids_are_admitted(session: str) -> None:
    verifier = RecordingVerifier()
    admit(request(session=session), load(), cast(TokenVerifier, verifier), NOW)
    assert verifier.calls == [("tok", session, NOW)]


def test_request_without_upgrade_gets_426() -> None:
    r = refuse(request(is_websocket_upgrade=False), load())
    assert r.error is ErrorCode.UPGRADE_REQUIRED
    assert r.error.status == 426


@pytest.mark.parametrize("authorization", [None, "", "Basic abc", "Bearer", "Bearer   "])
def test_missing_token_gets_401_token_missing(authorization: str | None) -> None:
    for query_token in (None, ""):
        r = refuse(request(query_token=query_token, authorization=authorization), load())
        assert r.error is ErrorCode.TOKEN_MISSING
        assert (r.error.status, r.error.code) == (401, "token_missing")


def test_paused_fallback_gets_403_fallback_paused() -> None:
    r = refuse(request(), load(paused=True))
    assert r.error is ErrorCode.FALLBACK_PAUSED
    assert (r.error.status, r.error.code) == (403, "fallback_paused")
    assert r.retry_after_s is None


@pytest.mark.parametrize("changes", [
    {"connections": 100}, {"connections": 101}, {"handshakes": 10}, {"handshakes": 500},
])
def test_overload_gets_503_overloaded_with_retry_after(changes: dict[str, int]) -> None:
    verifier = RecordingVerifier()
    r = refuse(request(), load(**changes), verifier)
    assert r.error is ErrorCode.OVERLOADED
    assert (r.error.status, r.error.code) == (503, "overloaded")
    assert r.retry_after_s is not None and r.retry_after_s > 0
    assert verifier.calls == []  # an overloaded relay spends nothing on signatures


def test_just_under_the_limits_is_admitted() -> None:
    verifier = RecordingVerifier()
    admit(request(), load(connections=99, handshakes=9), cast(TokenVerifier, verifier), NOW)
    assert len(verifier.calls) == 1


# --- order of the checks ------------------------------------------------------------------

def test_checks_run_in_the_documented_order() -> None:
    """Start with everything wrong and fix one fault at a time: each step shows the next."""
    req = request(session="bad session", query_token=None, authorization=None,
                  is_websocket_upgrade=False)
    ld = load(draining=True, paused=True, connections=100, handshakes=10)
    verifier = RecordingVerifier()
    steps: list[tuple[ErrorCode, UpgradeRequest, Load]] = [
        (ErrorCode.DRAINING, req, ld),
        (ErrorCode.BAD_REQUEST, req, ld := dataclasses.replace(ld, draining=False)),
        (ErrorCode.UPGRADE_REQUIRED, req := dataclasses.replace(req, session=SID), ld),
        (ErrorCode.TOKEN_MISSING, req := dataclasses.replace(req, is_websocket_upgrade=True),
         ld),
        (ErrorCode.FALLBACK_PAUSED, req := dataclasses.replace(req, query_token="tok"), ld),
        (ErrorCode.OVERLOADED, req, ld := dataclasses.replace(ld, paused=False)),
        (ErrorCode.OVERLOADED, req, ld := dataclasses.replace(ld, connections=0)),
    ]
    for expected, step_req, step_load in steps:
        assert refuse(step_req, step_load, verifier).error is expected
    assert verifier.calls == []
    admit(req, dataclasses.replace(ld, handshakes=0), cast(TokenVerifier, verifier), NOW)
    assert verifier.calls == [("tok", SID, NOW)]


def test_draining_relay_refuses_before_looking_at_session_or_token() -> None:
    verifier = RecordingVerifier()
    r = refuse(request(session=None, query_token=None, is_websocket_upgrade=False),
               load(draining=True, paused=True, connections=10**6), verifier)
    assert r.error is ErrorCode.DRAINING
    assert verifier.calls == []


def test_paused_relay_never_calls_the_verifier() -> None:
    verifier = RecordingVerifier()
    assert refuse(request(), load(paused=True), verifier).error is ErrorCode.FALLBACK_PAUSED
    assert verifier.calls == []


def test_missing_token_is_reported_before_overload() -> None:
    r = refuse(request(query_token=None), load(connections=10**6, handshakes=10**6))
    assert r.error is ErrorCode.TOKEN_MISSING


# --- where the token comes from -----------------------------------------------------------

def test_query_token_is_preferred_over_the_header() -> None:
    verifier = RecordingVerifier()
    admit(request(query_token="from-query", authorization="Bearer from-header"), load(),
          cast(TokenVerifier, verifier), NOW)
    assert verifier.calls[0][0] == "from-query"


@pytest.mark.parametrize("query_token", [None, ""])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_header_token_is_used_without_a_query_token(query_token: str | None,
                                                    scheme: str) -> None:
    verifier = RecordingVerifier()
    admit(request(query_token=query_token, authorization=f"{scheme} from-header"), load(),
          cast(TokenVerifier, verifier), NOW)
    assert verifier.calls == [("from-header", SID, NOW)]


# --- with real tokens ---------------------------------------------------------------------

def test_real_token_in_the_query_is_admitted(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW)
    claims = admit(request(query_token=token), load(), verifier, NOW + 1)
    assert claims.sid == SID
    assert claims.kid == key.kid
    assert "fallback-ws" in claims.cap


def test_real_token_in_the_header_is_admitted(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW)
    claims = admit(request(query_token=None, authorization=f"bearer {token}"), load(),
                   verifier, NOW)
    assert claims.sid == SID


def test_query_token_wins_even_when_only_the_header_token_is_good(
        key: SigningKey, verifier: TokenVerifier) -> None:
    good = mint_token(key, session_id=SID, now=NOW)
    r = refuse(request(query_token="not-a-jwt", authorization=f"Bearer {good}"), load(),
               verifier)
    assert r.error is ErrorCode.TOKEN_INVALID


def test_expired_token_is_refused_401(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW, ttl_s=60)
    assert admit(request(query_token=token), load(), verifier, NOW + 60).sid == SID  # leeway
    with pytest.raises(Refusal) as info:
        admit(request(query_token=token), load(), verifier, NOW + 60 + 31)
    r = info.value
    assert (r.error, r.error.status) == (ErrorCode.TOKEN_EXPIRED, 401)


def test_token_for_another_session_is_refused_403(key: SigningKey,
                                                  verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id="other-session", now=NOW)
    with pytest.raises(Refusal) as info:
        admit(request(query_token=token), load(), verifier, NOW)
    assert (info.value.error, info.value.error.status) == (ErrorCode.SESSION_MISMATCH, 403)


def test_token_without_the_fallback_capability_is_refused_403(
        key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW, caps=("telemetry",))
    with pytest.raises(Refusal) as info:
        admit(request(query_token=token), load(), verifier, NOW)
    assert (info.value.error, info.value.error.status) == (ErrorCode.NOT_ENTITLED, 403)


def test_token_from_an_untrusted_key_is_refused_401(verifier: TokenVerifier) -> None:
    stranger = SigningKey("stranger", Ed25519PrivateKey.generate())
    token = mint_token(stranger, session_id=SID, now=NOW)
    with pytest.raises(Refusal) as info:
        admit(request(query_token=token), load(), verifier, NOW)
    assert (info.value.error, info.value.error.status) == (ErrorCode.TOKEN_INVALID, 401)


def test_valid_token_does_not_get_past_a_pause_or_an_overload(
        key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW)
    assert refuse(request(query_token=token), load(paused=True),
                  verifier).error is ErrorCode.FALLBACK_PAUSED
    assert refuse(request(query_token=token), load(handshakes=10),
                  verifier).error is ErrorCode.OVERLOADED
    assert refuse(request(query_token=token), load(draining=True),
                  verifier).error is ErrorCode.DRAINING
