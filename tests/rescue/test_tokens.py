"""Tests for rescue.tokens: minting and verifying EdDSA relay tokens with a fake clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue import tokens
from rescue.codes import ErrorCode, Refusal
from rescue.config import load_config
from rescue.keys import SigningKey, generate_keypair, load_public_keys, load_signing_key
from rescue.tokens import (
    CAP_FALLBACK_WS,
    CAP_TELEMETRY,
    TokenClaims,
    TokenVerifier,
    mint_token,
)

NOW = 1_700_000_000.0
SID = "session-1"

# Keys made once in memory for hypothesis tests (function-scoped fixtures do not mix with @given).
MEM_KEY = SigningKey("mem", Ed25519PrivateKey.generate())
MEM_VERIFIER = TokenVerifier({"mem": MEM_KEY.private_key.public_key()})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(key: SigningKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A JWS built by hand, so tests can put anything into header and claims."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(key.private_key.sign(signing_input.encode()))}"


def claims_for(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW)
    claims: dict[str, Any] = {"sid": SID, "iat": iat, "nbf": iat, "exp": iat + 300,
                              "aud": "beach-rescue", "iss": "control-plane",
                              "cohort": "beta", "cap": [CAP_FALLBACK_WS]}
    for name, value in overrides.items():
        if value is ...:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


def token_with(key: SigningKey, **overrides: Any) -> str:
    return sign_raw(key, {"alg": "EdDSA", "typ": "JWT", "kid": key.kid}, claims_for(**overrides))


def refusal(verify: Callable[[], object]) -> Refusal:
    with pytest.raises(Refusal) as info:
        verify()
    return info.value


def assert_refused(verifier: TokenVerifier, token: str, code: ErrorCode, *,
                   session_id: str = SID, now: float = NOW) -> Refusal:
    r = refusal(lambda: verifier.verify(token, session_id, now))
    assert r.error is code, r.detail
    assert r.detail
    if len(token) > 10:
        assert token not in r.detail
        assert token not in str(r)
    return r


# --- mint_token -------------------------------------------------------------------------

def test_mint_then_verify_round_trips_every_claim(key: SigningKey,
                                                  verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW + 0.9, ttl_s=120, cohort="beta",
                       caps=(CAP_FALLBACK_WS, CAP_TELEMETRY), issuer="cp", audience="beach-rescue")
    claims = verifier.verify(token, SID, NOW + 1)
    assert claims == TokenClaims(sid=SID, iat=int(NOW), nbf=int(NOW), exp=int(NOW) + 120,
                                 aud="beach-rescue", iss="cp", cohort="beta",
                                 cap=(CAP_FALLBACK_WS, CAP_TELEMETRY), kid=key.kid)


def test_mint_header_and_defaults(key: SigningKey) -> None:
    token = mint_token(key, session_id=SID, now=NOW)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "JWT", "kid": key.kid}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {"sid": SID, "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 300,
                       "aud": "beach-rescue", "iss": "beach-rescue", "cohort": "public",
                       "cap": [CAP_FALLBACK_WS]}


@pytest.mark.parametrize("ttl", [0, -1, 301, 3600, True])
def test_mint_refuses_bad_lifetimes(key: SigningKey, ttl: int) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        mint_token(key, session_id=SID, now=NOW, ttl_s=ttl)


@pytest.mark.parametrize("sid", ["", "a b", "x" * 129, "caf\u00e9", "a/b", "abc\n", "a:b"])
def test_mint_refuses_bad_session_ids(key: SigningKey, sid: str) -> None:
    with pytest.raises(ValueError, match="session id"):
        mint_token(key, session_id=sid, now=NOW)


def test_mint_accepts_the_extremes(key: SigningKey, verifier: TokenVerifier) -> None:
    longest = "A-z_0.9" * 18 + "x" * 2  # 128 characters
    assert len(longest) == 128
    for sid, ttl in ((longest, 300), ("a", 1)):
        assert verifier.verify(mint_token(key, session_id=sid, now=NOW, ttl_s=ttl),
                               sid, NOW).sid == sid


# --- header, key id and signature ---------------------------------------------------------

@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "...", "eyJ.eyJ.sig",
                                  "x" * (tokens.MAX_TOKEN_CHARS + 1), "\u00ff.\u00ff.\u00ff"])
def test_refuses_strings_that_are_not_jwts(verifier: TokenVerifier, junk: str) -> None:
    assert_refused(verifier, junk, ErrorCode.TOKEN_INVALID)


def test_refuses_alg_none(key: SigningKey, verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": key.kid}).encode())
        payload = b64(json.dumps(claims_for()).encode())
        for token in (f"{header}.{payload}.", f"{header}.{payload}.{b64(b'x')}"):
            r = assert_refused(verifier, token, ErrorCode.TOKEN_INVALID)
            assert "algorithm" in r.detail


def hs256_token(secret: bytes, kid: str) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps(claims_for()).encode())
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def test_refuses_hs256_signed_with_the_public_key(key: SigningKey, fresh_key_dir: Path,
                                                  verifier: TokenVerifier) -> None:
    public = key.private_key.public_key()
    secrets = [(fresh_key_dir / f"{key.kid}.pub").read_bytes(),
               public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)]
    for secret in secrets:
        r = assert_refused(verifier, hs256_token(secret, key.kid), ErrorCode.TOKEN_INVALID)
        assert "algorithm" in r.detail


@pytest.mark.parametrize("alg", ["eddsa", "ES256", "RS256", "Ed25519", ["EdDSA"], None])
def test_refuses_any_other_alg_even_with_a_valid_signature(key: SigningKey,
                                                          verifier: TokenVerifier,
                                                          alg: Any) -> None:
    token = sign_raw(key, {"alg": alg, "kid": key.kid}, claims_for())
    assert_refused(verifier, token, ErrorCode.TOKEN_INVALID)


@pytest.mark.parametrize("kid", [..., None, 7, ["k"], {"k": 1}, "unknown-kid", ""])
def test_refuses_missing_or_unknown_kid(key: SigningKey, verifier: TokenVerifier,
                                        kid: Any) -> None:
    header: dict[str, Any] = {"alg": "EdDSA", "typ": "JWT"}
    if kid is not ...:
        header["kid"] = kid
    assert_refused(verifier, sign_raw(key, header, claims_for()), ErrorCode.TOKEN_INVALID)


def test_refuses_a_forged_signature_under_a_trusted_kid(key: SigningKey,
                                                        verifier: TokenVerifier) -> None:
    forger = SigningKey(key.kid, Ed25519PrivateKey.generate())
    r = assert_refused(verifier, mint_token(forger, session_id=SID, now=NOW),
                       ErrorCode.TOKEN_INVALID)
    assert "signature" in r.detail


def test_refuses_a_payload_altered_after_signing(key: SigningKey,
                                                 verifier: TokenVerifier) -> None:
    header, _, signature = mint_token(key, session_id=SID, now=NOW).split(".")
    other_payload = b64(json.dumps(claims_for(sid="other-session")).encode())
    assert_refused(verifier, f"{header}.{other_payload}.{signature}", ErrorCode.TOKEN_INVALID)


def test_refuses_critical_header_extensions(key: SigningKey, verifier: TokenVerifier) -> None:
    token = sign_raw(key, {"alg": "EdDSA", "kid": key.kid, "crit": ["exp"], "exp": 1},
                     claims_for())
    assert_refused(verifier, token, ErrorCode.TOKEN_INVALID)


def test_refuses_a_payload_that_is_not_an_object(key: SigningKey,
                                                 verifier: TokenVerifier) -> None:
    header = b64(json.dumps({"alg": "EdDSA", "kid": key.kid}).encode())
    payload = b64(b"[1, 2]")
    signing_input = f"{header}.{payload}"
    token = f"{signing_input}.{b64(key.private_key.sign(signing_input.encode()))}"
    assert_refused(verifier, token, ErrorCode.TOKEN_INVALID)


# --- key rotation -------------------------------------------------------------------------

def test_rotation_accepts_every_trusted_kid_and_drops_removed_ones(fresh_key_dir: Path) -> None:
    old = load_signing_key(fresh_key_dir)
    new_kid = generate_keypair(fresh_key_dir)
    new = load_signing_key(fresh_key_dir, new_kid)
    old_token = mint_token(old, session_id=SID, now=NOW)
    new_token = mint_token(new, session_id=SID, now=NOW)

    both = TokenVerifier(load_public_keys(fresh_key_dir))
    assert both.kids == {old.kid, new.kid}
    assert both.verify(old_token, SID, NOW).kid == old.kid
    assert both.verify(new_token, SID, NOW).kid == new.kid

    (fresh_key_dir / f"{old.kid}.pub").unlink()
    rotated = TokenVerifier(load_public_keys(fresh_key_dir))
    r = assert_refused(rotated, old_token, ErrorCode.TOKEN_INVALID)
    assert "unknown key" in r.detail
    assert rotated.verify(new_token, SID, NOW).kid == new.kid


def test_a_verifier_keeps_its_own_copy_of_the_key_set(key: SigningKey, fresh_key_dir: Path) -> None:
    trusted = load_public_keys(fresh_key_dir)
    verifier = TokenVerifier(trusted)
    trusted.clear()
    assert verifier.verify(mint_token(key, session_id=SID, now=NOW), SID, NOW).kid == key.kid


def test_verifier_needs_keys() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TokenVerifier({})


# --- claim types --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value"), [
    ("sid", ...), ("sid", 12), ("sid", None),
    ("iat", ...), ("iat", "1700000000"), ("iat", True), ("iat", 1.5), ("iat", None),
    ("nbf", ...), ("nbf", [1]), ("nbf", float("inf")),
    ("exp", ...), ("exp", "soon"), ("exp", 1.7e9 + 0.25),
    ("cohort", 5), ("cohort", None),
    ("cap", ...), ("cap", CAP_FALLBACK_WS), ("cap", [1]), ("cap", {"fallback-ws": True}),
    ("iss", 3),
    ("aud", ...), ("aud", 1), ("aud", ["beach-rescue", 2]),
])
def test_refuses_missing_or_ill_typed_claims(key: SigningKey, verifier: TokenVerifier,
                                             name: str, value: Any) -> None:
    r = assert_refused(verifier, token_with(key, **{name: value}), ErrorCode.TOKEN_INVALID)
    assert name in r.detail


def test_accepts_integer_valued_floats_and_defaults_the_cohort(
        key: SigningKey, verifier: TokenVerifier) -> None:
    token = token_with(key, iat=NOW, nbf=NOW, exp=NOW + 60.0, cohort=...)
    claims = verifier.verify(token, SID, NOW)
    assert (claims.iat, claims.nbf, claims.exp) == (int(NOW), int(NOW), int(NOW) + 60)
    assert all(type(v) is int for v in (claims.iat, claims.nbf, claims.exp))
    assert claims.cohort == "public"


# --- audience and issuer ------------------------------------------------------------------

def test_audience_may_be_a_string_or_a_list(key: SigningKey, verifier: TokenVerifier) -> None:
    assert verifier.verify(token_with(key, aud=["other", "beach-rescue"]), SID, NOW).aud \
        == "beach-rescue"
    for aud in ("other", ["other"], [], "beach-rescue-2", "Beach-Rescue"):
        r = assert_refused(verifier, token_with(key, aud=aud), ErrorCode.TOKEN_INVALID)
        assert "audience" in r.detail


def test_configured_audience(key: SigningKey, fresh_key_dir: Path) -> None:
    verifier = TokenVerifier(load_public_keys(fresh_key_dir), audience="relay-eu")
    assert verifier.verify(token_with(key, aud="relay-eu"), SID, NOW).aud == "relay-eu"
    assert_refused(verifier, token_with(key), ErrorCode.TOKEN_INVALID)


def test_issuer_checked_only_when_configured(key: SigningKey, fresh_key_dir: Path,
                                             verifier: TokenVerifier) -> None:
    assert verifier.verify(token_with(key, iss="anyone"), SID, NOW).iss == "anyone"
    assert verifier.verify(token_with(key, iss=...), SID, NOW).iss == ""

    strict = TokenVerifier(load_public_keys(fresh_key_dir), issuer="control-plane")
    assert strict.verify(token_with(key), SID, NOW).iss == "control-plane"
    for iss in ("anyone", ...):
        r = assert_refused(strict, token_with(key, iss=iss), ErrorCode.TOKEN_INVALID)
        assert "issuer" in r.detail


# --- lifetime and time window -------------------------------------------------------------

def test_lifetime_limit(key: SigningKey, fresh_key_dir: Path, verifier: TokenVerifier) -> None:
    iat = int(NOW)
    assert verifier.verify(token_with(key, exp=iat + 300), SID, NOW).exp == iat + 300
    r = assert_refused(verifier, token_with(key, exp=iat + 301), ErrorCode.TOKEN_INVALID)
    assert "lifetime" in r.detail
    assert_refused(verifier, token_with(key, exp=iat), ErrorCode.TOKEN_INVALID)

    short = TokenVerifier(load_public_keys(fresh_key_dir), max_lifetime_s=60)
    assert short.verify(token_with(key, exp=iat + 60), SID, NOW).exp == iat + 60
    assert_refused(short, token_with(key, exp=iat + 61), ErrorCode.TOKEN_INVALID)


def test_not_before_edges(key: SigningKey, verifier: TokenVerifier) -> None:
    iat = int(NOW)
    token = token_with(key, nbf=iat + 100)
    assert verifier.verify(token, SID, iat + 70).nbf == iat + 100  # exactly at nbf - leeway
    r = assert_refused(verifier, token, ErrorCode.TOKEN_INVALID, now=iat + 69.999)
    assert r.detail == "token not yet valid"


def test_issued_in_the_future_edges(key: SigningKey, verifier: TokenVerifier) -> None:
    iat = int(NOW) + 100
    token = token_with(key, iat=iat, nbf=iat - 200, exp=iat + 100)
    assert verifier.verify(token, SID, iat - 30).iat == iat
    r = assert_refused(verifier, token, ErrorCode.TOKEN_INVALID, now=iat - 30.5)
    assert "future" in r.detail


def test_expiry_edges(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW, ttl_s=60)
    exp = int(NOW) + 60
    claims = verifier.verify(token, SID, exp + 29.999)
    assert not verifier.expired(claims, exp + 29.999)
    assert verifier.expired(claims, exp + 30)
    r = assert_refused(verifier, token, ErrorCode.TOKEN_EXPIRED, now=exp + 30)
    assert "expired" in r.detail
    assert_refused(verifier, token, ErrorCode.TOKEN_EXPIRED, now=exp + 10_000)


def test_zero_leeway(key: SigningKey, fresh_key_dir: Path) -> None:
    strict = TokenVerifier(load_public_keys(fresh_key_dir), leeway_s=0)
    token = mint_token(key, session_id=SID, now=NOW, ttl_s=10)
    assert_refused(strict, token, ErrorCode.TOKEN_INVALID, now=NOW - 0.5)
    assert strict.verify(token, SID, int(NOW) + 9.999).sid == SID
    assert_refused(strict, token, ErrorCode.TOKEN_EXPIRED, now=int(NOW) + 10)


# --- session and capability ---------------------------------------------------------------

def test_session_mismatch(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint_token(key, session_id=SID, now=NOW)
    for other in ("session-2", "Session-1", "session-1 ", ""):
        assert_refused(verifier, token, ErrorCode.SESSION_MISMATCH, session_id=other)


def test_capability_required_unless_disabled(key: SigningKey, fresh_key_dir: Path,
                                             verifier: TokenVerifier) -> None:
    for caps in ((), (CAP_TELEMETRY,), ("fallback-WS",)):
        token = mint_token(key, session_id=SID, now=NOW, caps=caps)
        r = assert_refused(verifier, token, ErrorCode.NOT_ENTITLED)
        assert CAP_FALLBACK_WS in r.detail
        lenient = TokenVerifier(load_public_keys(fresh_key_dir), require_capability=False)
        assert lenient.verify(token, SID, NOW).cap == caps


# --- check order --------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "session_id", "now", "code"), [
    # a bad signature hides everything else: see test_order_signature_first
    ({"sid": 1, "exp": 1}, SID, NOW, ErrorCode.TOKEN_INVALID),            # types before time
    ({"aud": "x"}, "other", NOW + 10_000, ErrorCode.TOKEN_INVALID),       # aud before time/sid
    ({"exp": int(NOW) + 400}, "other", NOW + 10_000, ErrorCode.TOKEN_INVALID),  # lifetime
    ({"cap": []}, "other", NOW + 10_000, ErrorCode.TOKEN_EXPIRED),        # time before sid
    ({"cap": []}, "other", NOW, ErrorCode.SESSION_MISMATCH),              # sid before cap
])
def test_check_order(*, key: SigningKey, verifier: TokenVerifier, overrides: dict[str, Any],
                     session_id: str, now: float, code: ErrorCode) -> None:
    assert_refused(verifier, token_with(key, **overrides), code, session_id=session_id, now=now)


def test_order_signature_first(key: SigningKey, verifier: TokenVerifier) -> None:
    forger = SigningKey(key.kid, Ed25519PrivateKey.generate())
    token = token_with(forger, sid=7, aud="x", cap=[])
    r = assert_refused(verifier, token, ErrorCode.TOKEN_INVALID, session_id="o", now=0)
    assert "signature" in r.detail


# --- cache --------------------------------------------------------------------------------

class DecodeCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)


def test_cache_skips_the_signature_but_never_the_clock(
        key: SigningKey, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    token = mint_token(key, session_id=SID, now=NOW, ttl_s=60)
    first = verifier.verify(token, SID, NOW)
    assert verifier.verify(token, SID, NOW + 1) == first
    assert counter.calls == 1
    assert_refused(verifier, token, ErrorCode.TOKEN_EXPIRED, now=int(NOW) + 90)
    assert_refused(verifier, token, ErrorCode.TOKEN_INVALID, now=NOW - 100)
    assert_refused(verifier, token, ErrorCode.SESSION_MISMATCH, session_id="other")
    assert counter.calls == 1
    assert verifier.verify(token, SID, NOW + 2) == first


def test_cache_does_not_remember_refused_tokens(
        key: SigningKey, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    forged = mint_token(SigningKey(key.kid, Ed25519PrivateKey.generate()), session_id=SID,
                        now=NOW)
    for _ in range(3):
        assert_refused(verifier, forged, ErrorCode.TOKEN_INVALID)
    assert counter.calls == 3


def test_cache_is_a_bounded_lru(key: SigningKey, fresh_key_dir: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(load_public_keys(fresh_key_dir), cache_size=2)
    counter = DecodeCounter(monkeypatch)
    a, b, c = (mint_token(key, session_id=s, now=NOW) for s in ("a", "b", "c"))
    verifier.verify(a, "a", NOW)
    verifier.verify(b, "b", NOW)
    verifier.verify(a, "a", NOW)    # hit; a becomes most recent
    assert counter.calls == 2
    verifier.verify(c, "c", NOW)    # evicts b
    verifier.verify(a, "a", NOW)    # still cached
    assert counter.calls == 3
    verifier.verify(b, "b", NOW)    # was evicted
    assert counter.calls == 4


def test_cache_can_be_disabled(key: SigningKey, fresh_key_dir: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(load_public_keys(fresh_key_dir), cache_size=0)
    counter = DecodeCounter(monkeypatch)
    token = mint_token(key, session_id=SID, now=NOW)
    for _ in range(3):
        verifier.verify(token, SID, NOW)
    assert counter.calls == 3


# --- configuration ------------------------------------------------------------------------

def test_from_config_applies_the_token_settings(key: SigningKey, fresh_key_dir: Path) -> None:
    config = load_config(environ={}, overrides={
        "token_audience": "relay-eu", "token_issuer": "cp", "token_leeway_s": 5,
        "token_max_lifetime_s": 100, "entitlement_checks": False})
    verifier = TokenVerifier.from_config(config, load_public_keys(fresh_key_dir))
    token = mint_token(key, session_id=SID, now=NOW, ttl_s=100, caps=(), issuer="cp",
                       audience="relay-eu")
    assert verifier.verify(token, SID, NOW).cap == ()
    assert_refused(verifier, token, ErrorCode.TOKEN_EXPIRED, now=int(NOW) + 105)
    assert verifier.verify(token, SID, int(NOW) + 104.5).sid == SID
    assert_refused(verifier, mint_token(key, session_id=SID, now=NOW, issuer="cp"),
                   ErrorCode.TOKEN_INVALID)  # default audience
    assert_refused(verifier, mint_token(key, session_id=SID, now=NOW, ttl_s=101, issuer="x",
                                        audience="relay-eu"), ErrorCode.TOKEN_INVALID)


def test_from_config_defaults_require_the_capability(key: SigningKey, fresh_key_dir: Path) -> None:
    verifier = TokenVerifier.from_config(load_config(environ={}), load_public_keys(fresh_key_dir))
    assert_refused(verifier, mint_token(key, session_id=SID, now=NOW, caps=()),
                   ErrorCode.NOT_ENTITLED)


# --- properties ---------------------------------------------------------------------------

session_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True)
cap_lists = st.lists(st.text(max_size=20), max_size=5).map(lambda c: [CAP_FALLBACK_WS, *c])


@settings(max_examples=60, deadline=None)
@given(sid=session_ids, cohort=st.text(min_size=1, max_size=40), caps=cap_lists,
       ttl=st.integers(1, 300), now=st.floats(1e9, 4e9), offset=st.floats(-30, 329))
def test_mint_verify_round_trip(*, sid: str, cohort: str, caps: list[str], ttl: int,
                                now: float, offset: float) -> None:
    token = mint_token(MEM_KEY, session_id=sid, now=now, ttl_s=ttl, cohort=cohort, caps=caps)
    check_at = int(now) + min(offset, ttl + 29.0)
    claims = MEM_VERIFIER.verify(token, sid, check_at)
    assert (claims.sid, claims.cohort, claims.cap) == (sid, cohort, tuple(caps))
    assert claims.exp - claims.iat == ttl
    assert claims.kid == MEM_KEY.kid


@settings(max_examples=200, deadline=None)
@given(junk=st.one_of(st.text(max_size=300),
                      st.lists(st.text(max_size=60), min_size=3, max_size=3).map(".".join)))
def test_arbitrary_strings_are_only_ever_refused_as_invalid(junk: str) -> None:
    r = refusal(lambda: MEM_VERIFIER.verify(junk, SID, NOW))
    assert r.error is ErrorCode.TOKEN_INVALID


BASE_TOKEN = mint_token(MEM_KEY, session_id=SID, now=NOW)
BASE_CLAIMS = MEM_VERIFIER.verify(BASE_TOKEN, SID, NOW)
B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(BASE_TOKEN) - 1), char=st.sampled_from(B64_CHARS))
def test_a_changed_character_never_yields_different_claims(position: int, char: str) -> None:
    tampered = BASE_TOKEN[:position] + char + BASE_TOKEN[position + 1:]
    verifier = TokenVerifier({"mem": MEM_KEY.private_key.public_key()}, cache_size=0)
    try:
        claims = verifier.verify(tampered, SID, NOW)
    except Refusal as r:
        assert r.error is ErrorCode.TOKEN_INVALID
    else:
        assert claims == BASE_CLAIMS
