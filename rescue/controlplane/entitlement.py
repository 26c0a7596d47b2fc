"""Entitlement proofs: a JWT from the identity provider granting ``rescue:fallback``.

The provider's keys come from a JWKS file (rotate by replacing the file and reloading).
Accepted algorithms: ES256, RS256 and EdDSA; the key is chosen by the proof's ``kid``.
The entitlement is read from an ``entitlements`` list claim or a space-separated
``scope`` claim. Time is the caller's (``now``), checked with a leeway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

ENTITLEMENT = "rescue:fallback"
ALGORITHMS = ("ES256", "RS256", "EdDSA")


class EntitlementError(Exception):
    """A proof was refused; ``missing`` tells a valid proof without the entitlement."""

    def __init__(self, detail: str, *, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.missing = missing


def load_jwks(path: str | Path) -> dict[str, PyJWK]:
    """Load a JWKS file into ``{kid: key}``; raises ``ValueError`` naming the problem."""
    try:
        data = json.loads(Path(path).read_text())
        keys = PyJWKSet.from_dict(data).keys
    except (OSError, ValueError, jwt.PyJWTError) as e:
        raise ValueError(f"cannot load JWKS {path}: {e}") from None
    out = {k.key_id: k for k in keys if k.key_id}
    if not out:
        raise ValueError(f"JWKS {path} has no key with a `kid`")
    return out


class EntitlementVerifier:
    """Checks entitlement proofs against a fixed key set."""

    def __init__(self, keys: Mapping[str, PyJWK], *, leeway_s: float = 30.0) -> None:
        self.keys = dict(keys)
        self.leeway_s = leeway_s

    def verify(self, proof: str, now: float) -> dict[str, Any]:
        """Return the proof's claims if it is valid and grants ``rescue:fallback``."""
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            raise EntitlementError("entitlement_proof is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise EntitlementError(f"entitlement_proof algorithm must be one of {ALGORITHMS}")
        key = self.keys.get(str(header.get("kid")))
        if key is None:
            raise EntitlementError("entitlement_proof is signed by an unknown key")
        if key.algorithm_name != alg:
            # The key decides the algorithm, never the token (no algorithm confusion).
            raise EntitlementError(f"entitlement_proof uses {alg} but its key is "
                                   f"{key.algorithm_name}")
        try:
            claims: dict[str, Any] = jwt.decode(
                proof, key.key, algorithms=[alg],
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_aud": False, "require": ["exp"]})
        except (jwt.PyJWTError, TypeError, ValueError) as e:
            raise EntitlementError(f"entitlement_proof is invalid: {e}") from None
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise EntitlementError("entitlement_proof has ill-typed exp/nbf")
        if now >= exp + self.leeway_s:
            raise EntitlementError("entitlement_proof expired")
        if nbf > now + self.leeway_s:
            raise EntitlementError("entitlement_proof is not yet valid")
        granted = claims.get("entitlements", [])
        scope = claims.get("scope", "")
        if not isinstance(granted, list):
            granted = []
        if ENTITLEMENT not in granted and ENTITLEMENT not in str(scope).split():
            raise EntitlementError(f"entitlement_proof does not grant {ENTITLEMENT}",
                                   missing=True)
        return claims
