"""Entitlement proofs: JWKS loading and the verifier, with real ES256, RS256 and Ed25519 keys.

The identity provider's public keys go into a JWKS file written with PyJWT's
``to_jwk``; proofs are signed with the private halves. Time is the caller's ``now``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from rescue.controlplane.entitlement import (
    ENTITLEMENT,
    EntitlementError,
    EntitlementVerifier,
    load_jwks,
)

NOW = 1_750_000_000.0
LEEWAY_S = 30.0


@dataclass(frozen=True)
class Provider:
    """An identity provider's key of one algorithm: its kid, alg and private key."""

    kid: str
    alg: str
    private_key: Any


@pytest.fixture(scope="module")
def providers() -> dict[str, Provider]:
    return {
        "ES256": Provider("idp-ec", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "RS256": Provider("idp-rsa", "RS256",
                          rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "EdDSA": Provider("idp-ed", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


def write_jwks(path: Path, providers: dict[str, Provider]) -> Path:
    """Write the providers' public keys as a JWKS file; return its path."""
    to_jwk: dict[str, Callable[..., Any]] = {
        "ES256": ECAlgorithm.to_jwk, "RS256": RSAAlgorithm.to_jwk, "EdDSA": OKPAlgorithm.to_jwk}
    keys = []
    for alg, provider in providers.items():
        jwk: dict[str, Any] = to_jwk[alg](provider.private_key.public_key(), as_dict=True)
        jwk.update(kid=provider.kid, use="sig")
        keys.append(jwk)
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.fixture(scope="module")
def jwks_path(providers: dict[str, Provider], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jwks(tmp_path_factory.mktemp("idp") / "jwks.json", providers)


@pytest.fixture(scope="module")
def verifier(jwks_path: Path) -> EntitlementVerifier:
    return EntitlementVerifier(load_jwks(jwks_path), leeway_s=LEEWAY_S)


def proof(provider: Provider, claims: dict[str, Any] | None = None, *,
          alg: str | None = None, kid: str | None = None, key: Any = None) -> str:
    """A proof signed by ``provider`` (or ``key``), valid for 10 minutes after NOW by default."""
    body: dict[str, Any] = {"sub": "user-1", "iat": int(NOW), "exp": int(NOW) + 600,
                            "entitlements": [ENTITLEMENT]}
    body.update(claims or {})
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, provider.private_key if key is None else key,
                      algorithm=alg or provider.alg,
                      headers={"kid": provider.kid if kid is None else kid})


def refused(verifier: EntitlementVerifier, token: str, now: float = NOW) -> EntitlementError:
    with pytest.raises(EntitlementError) as info:
        verifier.verify(token, now)
    return info.value


# --- the JWKS file ----------------------------------------------------------------------


def test_load_jwks_maps_every_kid_to_its_key(jwks_path: Path,
                                              providers: dict[str, Provider]) -> None:
    keys = load_jwks(jwks_path)
    assert set(keys) == {p.kid for p in providers.values()}
    assert {kid: key.algorithm_name for kid, key in keys.items()} == {
        p.kid: alg for alg, p in providers.items()}


def test_load_jwks_skips_keys_without_kid(tmp_path: Path,
                                          providers: dict[str, Provider]) -> None:
    path = write_jwks(tmp_path / "jwks.json", providers)
    data = json.loads(path.read_text())
    del data["keys"][0]["kid"]
    path.write_text(json.dumps(data))
    assert set(load_jwks(path)) == {p.kid for p in providers.values()} - {"idp-ec"}


@pytest.mark.parametrize("content", [
    pytest.param(None, id="missing"),
    pytest.param("not json", id="not-json"),
    pytest.param(json.dumps({"keys": []}), id="empty"),
    pytest.param(json.dumps({"nokeys": 1}), id="no-keys-member"),
    pytest.param(json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA",
                                       "kid": "bad"}]}), id="unusable-key"),
])
def test_load_jwks_refuses_a_bad_file_naming_it(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"jwks\.json"):
        load_jwks(path)


def test_load_jwks_refuses_a_set_where_no_key_has_a_kid(
        tmp_path: Path, providers: dict[str, Provider]) -> None:
    path = write_jwks(tmp_path / "jwks.json", providers)
    data = json.loads(path.read_text())
    for key in data["keys"]:
        del key["kid"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="kid"):
        load_jwks(path)


# --- valid proofs -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_valid_proof_of_each_algorithm_is_accepted(
        verifier: EntitlementVerifier, providers: dict[str, Provider], alg: str) -> None:
    claims = verifier.verify(proof(providers[alg]), NOW)
    assert claims["sub"] == "user-1"
    assert ENTITLEMENT in claims["entitlements"]


def test_scope_claim_grants_the_entitlement(verifier: EntitlementVerifier,
                                            providers: dict[str, Provider]) -> None:
    token = proof(providers["ES256"], {"entitlements": None,
                                       "scope": f"openid profile {ENTITLEMENT}"})
    assert verifier.verify(token, NOW)["scope"].endswith(ENTITLEMENT)


def test_time_is_the_callers(verifier: EntitlementVerifier,
                             providers: dict[str, Provider]) -> None:
    """A proof that expired long ago in wall-clock time is valid at a ``now`` before its exp."""
    token = proof(providers["EdDSA"], {"iat": 1000, "exp": 2000})
    assert verifier.verify(token, 1500.0)["exp"] == 2000
    assert time.time() > 2000
    assert refused(verifier, token, now=2000 + LEEWAY_S).missing is False


def test_expiry_allows_the_leeway(verifier: EntitlementVerifier,
                                  providers: dict[str, Provider]) -> None:
    token = proof(providers["RS256"], {"exp": int(NOW)})
    assert verifier.verify(token, NOW + LEEWAY_S - 1)["exp"] == int(NOW)
    error = refused(verifier, token, now=NOW + LEEWAY_S)
    assert "expired" in error.detail
    assert error.missing is False


def test_not_yet_valid_beyond_the_leeway_is_refused(verifier: EntitlementVerifier,
                                                     providers: dict[str, Provider]) -> None:
    early = proof(providers["ES256"], {"nbf": int(NOW) + 10})
    assert verifier.verify(early, NOW)["nbf"] == int(NOW) + 10  # within the leeway
    late = proof(providers["ES256"], {"nbf": int(NOW + LEEWAY_S) + 5})
    assert "not yet valid" in refused(verifier, late).detail


# --- invalid proofs (401 entitlement_invalid at the API) ----------------------------------


def test_expired_proof_is_invalid(verifier: EntitlementVerifier,
                                  providers: dict[str, Provider]) -> None:
    token = proof(providers["ES256"], {"iat": int(NOW) - 7200, "exp": int(NOW) - 3600})
    error = refused(verifier, token)
    assert error.missing is False
    assert "expired" in error.detail


def test_unknown_kid_is_invalid(verifier: EntitlementVerifier,
                                providers: dict[str, Provider]) -> None:
    error = refused(verifier, proof(providers["ES256"], kid="idp-rotated-away"))
    assert error.missing is False
    assert "unknown key" in error.detail


def test_proof_signed_by_another_key_under_a_known_kid_is_invalid(
        verifier: EntitlementVerifier, providers: dict[str, Provider]) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    error = refused(verifier, proof(providers["ES256"], key=impostor))
    assert error.missing is False
    assert "invalid" in error.detail


def test_tampered_claims_are_invalid(verifier: EntitlementVerifier,
                                     providers: dict[str, Provider]) -> None:
    header, _, signature = proof(providers["EdDSA"], {"entitlements": []}).split(".")
    forged = base64.urlsafe_b64encode(json.dumps(
        {"sub": "user-1", "exp": int(NOW) + 600, "entitlements": [ENTITLEMENT]}).encode()
    ).rstrip(b"=").decode()
    error = refused(verifier, f"{header}.{forged}.{signature}")
    assert error.missing is False


def test_hs256_is_refused_even_under_a_known_kid(verifier: EntitlementVerifier,
                                                  providers: dict[str, Provider]) -> None:
    token = proof(providers["RS256"], alg="HS256", key=b"k" * 64)
    error = refused(verifier, token)
    assert error.missing is False
    assert "algorithm" in error.detail


def test_alg_none_is_refused(verifier: EntitlementVerifier,
                             providers: dict[str, Provider]) -> None:
    token = jwt.encode({"exp": int(NOW) + 600, "entitlements": [ENTITLEMENT]}, "",
                       algorithm="none", headers={"kid": providers["ES256"].kid})
    error = refused(verifier, token)
    assert error.missing is False
    assert "algorithm" in error.detail


def test_unlisted_asymmetric_algorithm_is_refused(verifier: EntitlementVerifier,
                                                   providers: dict[str, Provider]) -> None:
    error = refused(verifier, proof(providers["RS256"], alg="PS256"))
    assert "algorithm" in error.detail


@pytest.mark.parametrize(("kid_of", "signed_as"), [
    ("ES256", "RS256"),
    ("RS256", "ES256"),
    ("EdDSA", "ES256"),
    ("ES256", "EdDSA"),
    ("RS256", "EdDSA"),
], ids=["rs256-under-ec-kid", "es256-under-rsa-kid", "es256-under-ed-kid",
        "eddsa-under-ec-kid", "eddsa-under-rsa-kid"])
def test_wrong_algorithm_for_the_kids_key_is_invalid(
        verifier: EntitlementVerifier, providers: dict[str, Provider],
        kid_of: str, signed_as: str) -> None:
    """The kid's key decides the algorithm, never the proof's header (no alg confusion)."""
    token = proof(providers[signed_as], kid=providers[kid_of].kid)
    assert refused(verifier, token).missing is False


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30"])
def test_garbage_is_invalid(verifier: EntitlementVerifier, token: str) -> None:
    error = refused(verifier, token)
    assert error.missing is False


@pytest.mark.parametrize("claims", [{"exp": None}, {"exp": "tomorrow"}, {"nbf": "now"}],
                         ids=["no-exp", "string-exp", "string-nbf"])
def test_missing_or_ill_typed_times_are_invalid(verifier: EntitlementVerifier,
                                                providers: dict[str, Provider],
                                                claims: dict[str, Any]) -> None:
    assert refused(verifier, proof(providers["ES256"], claims)).missing is False


# --- valid but not entitled (403 entitlement_missing at the API) --------------------------


@pytest.mark.parametrize("claims", [
    {"entitlements": None},
    {"entitlements": []},
    {"entitlements": ["rescue:admin", "fallback"]},
    {"entitlements": ENTITLEMENT},  # a string, not a list
    {"entitlements": None, "scope": "openid rescue:fallbackx rescue"},
], ids=["no-claim", "empty", "others", "string-not-list", "scope-near-miss"])
def test_valid_proof_without_the_entitlement_is_missing(
        verifier: EntitlementVerifier, providers: dict[str, Provider],
        claims: dict[str, Any]) -> None:
    error = refused(verifier, proof(providers["EdDSA"], claims))
    assert error.missing is True
    assert ENTITLEMENT in error.detail
