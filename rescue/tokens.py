"""Relay tokens (protocol section 2): EdDSA-signed JWTs, minted and verified without I/O.

Time is never read here: callers pass ``now`` (unix seconds), so tests use fake clocks.
:class:`TokenVerifier` refuses a token by raising :class:`rescue.codes.Refusal` with the
protocol's error code; its ``detail`` is a short human string that never contains the
token. Checks run in a fixed order: encoding, header, key id and signature; claim types;
audience and issuer; lifetime; time window; session id; capability.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rescue.codes import ErrorCode, Refusal
from rescue.hello import is_valid_session_id

if TYPE_CHECKING:
    from rescue.config import Config
    from rescue.keys import SigningKey

CAP_FALLBACK_WS = "fallback-ws"
CAP_TELEMETRY = "telemetry"
ALGORITHM = "EdDSA"
DEFAULT_AUDIENCE = "beach-rescue"
DEFAULT_COHORT = "public"
MAX_TTL_S = 300
MAX_TOKEN_CHARS = 8192
"""Longer strings are refused before any parsing (a real token is a few hundred bytes)."""

# PyJWT checks the signature only; every claim is checked below, against the caller's clock.
_DECODE_OPTIONS: Any = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False,
    "verify_iat": False, "verify_aud": False, "verify_iss": False,
    "verify_sub": False, "verify_jti": False, "require": [],
}


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The claims of a token whose signature and claim types have been checked."""

    sid: str
    iat: int
    nbf: int
    exp: int
    aud: str
    iss: str
    cohort: str
    cap: tuple[str, ...]
    kid: str


def mint_token(key: SigningKey, *, session_id: str, now: float, ttl_s: int = MAX_TTL_S,
               cohort: str = DEFAULT_COHORT, caps: Sequence[str] = (CAP_FALLBACK_WS,),
               issuer: str = "beach-rescue", audience: str = DEFAULT_AUDIENCE) -> str:
    """Return a JWT for ``session_id``, valid from ``int(now)`` for ``ttl_s`` seconds.

    Raises ``ValueError`` if ``ttl_s`` is not in 1..300, the session id is invalid, or
    ``cohort``/``caps`` are not strings.
    """
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"token lifetime must be 1 to {MAX_TTL_S} seconds, not {ttl_s!r}")
    if not is_valid_session_id(session_id):
        raise ValueError(f"invalid session id {session_id!r}: "
                         "use 1-128 characters of A-Z a-z 0-9 . _ -")
    if not isinstance(cohort, str) or not cohort:
        raise ValueError("cohort must be a non-empty string")
    if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
        raise ValueError("caps must be a sequence of strings")
    iat = int(now)
    claims = {"sid": session_id, "iat": iat, "nbf": iat, "exp": iat + ttl_s,
              "aud": audience, "iss": issuer, "cohort": cohort, "cap": list(caps)}
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM,
                      headers={"kid": key.kid, "typ": "JWT"})


def _invalid(detail: str) -> Refusal:
    return Refusal(ErrorCode.TOKEN_INVALID, detail)


def _int_claim(payload: Mapping[str, Any], name: str) -> int:
    value = payload.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise _invalid(f"claim '{name}' is missing or not an integer")


def _str_claim(payload: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = payload.get(name, default)
    if not isinstance(value, str):
        raise _invalid(f"claim '{name}' is missing or not a string")
    return value


class TokenVerifier:
    """Checks relay tokens against a fixed set of trusted Ed25519 public keys.

    Signature checks are cached per token string in a bounded LRU (reconnect storms
    reuse tokens); the time, session and capability checks run on every call. An
    instance is meant for one thread (one event loop); build a new one to change keys.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], *,
                 audience: str = DEFAULT_AUDIENCE, issuer: str = "", leeway_s: float = 30.0,
                 max_lifetime_s: int = MAX_TTL_S, require_capability: bool = True,
                 cache_size: int = 4096) -> None:
        if not keys:
            raise ValueError("a token verifier needs at least one public key")
        for kid, key in keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"key {kid!r} is not an Ed25519 public key")
        if leeway_s < 0 or max_lifetime_s < 1 or cache_size < 0:
            raise ValueError("leeway_s, max_lifetime_s and cache_size must not be negative")
        self._keys = dict(keys)
        self._audience = audience
        self._issuer = issuer
        self._leeway_s = leeway_s
        self._max_lifetime_s = max_lifetime_s
        self._require_capability = require_capability
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()

    @classmethod
    def from_config(cls, config: Config, keys: Mapping[str, Ed25519PublicKey]) -> TokenVerifier:
        """Build a verifier with the ``token_*`` and ``entitlement_checks`` settings."""
        return cls(keys, audience=config.token_audience, issuer=config.token_issuer,
                   leeway_s=config.token_leeway_s, max_lifetime_s=config.token_max_lifetime_s,
                   require_capability=config.entitlement_checks)

    @property
    def kids(self) -> frozenset[str]:
        """The key ids this verifier trusts."""
        return frozenset(self._keys)

    def verify(self, token: str, session_id: str, now: float) -> TokenClaims:
        """Return the claims of ``token`` if it lets its bearer join ``session_id`` at ``now``.

        Raises :class:`Refusal` with ``TOKEN_INVALID``, ``TOKEN_EXPIRED``,
        ``SESSION_MISMATCH`` or ``NOT_ENTITLED``.
        """
        # Keyed by a 128-bit digest, not the token: a cached entry costs ~300 bytes
        # instead of ~1 KiB (the cache is sized for a whole worker's reconnect storm).
        key = (hashlib.blake2b(token.encode(), digest_size=16).digest()
               if isinstance(token, str) else b"")
        claims = self._cache.get(key) if key else None
        if claims is not None:
            self._cache.move_to_end(key)
        else:
            claims = self._check_static(token)
            if self._cache_size:
                self._cache[key] = claims
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if claims.nbf > now + self._leeway_s:
            raise _invalid("token not yet valid")
        if claims.iat > now + self._leeway_s:
            raise _invalid("token issued in the future")
        if self.expired(claims, now):
            raise Refusal(ErrorCode.TOKEN_EXPIRED, "token expired")
        if claims.sid != session_id:
            raise Refusal(ErrorCode.SESSION_MISMATCH, "token is for another session")
        if self._require_capability and CAP_FALLBACK_WS not in claims.cap:
            raise Refusal(ErrorCode.NOT_ENTITLED,
                          f"token lacks the '{CAP_FALLBACK_WS}' capability")
        return claims

    def expired(self, claims: TokenClaims, now: float) -> bool:
        """Return whether ``claims`` have expired at ``now``: ``now >= exp + leeway``."""
        return now >= claims.exp + self._leeway_s

    def _check_static(self, token: str) -> TokenClaims:
        """Run every check that does not depend on the clock or the requested session."""
        if not isinstance(token, str) or not token:
            raise _invalid("token is empty")
        if len(token) > MAX_TOKEN_CHARS:
            raise _invalid("token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise _invalid(f"token algorithm must be {ALGORITHM}")
        if "crit" in header or "b64" in header:
            raise _invalid("token uses unsupported header extensions")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("token header has no key id")
        key = self._keys.get(kid)
        if key is None:
            raise _invalid("token signed with an unknown key id")
        try:
            payload = jwt.decode(token, key, algorithms=[ALGORITHM], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise _invalid("token signature is invalid") from None
        except jwt.InvalidTokenError:
            raise _invalid("token is not a well-formed JWT") from None
        claims = self._claims(payload, kid)
        if self._audience not in self._audiences(payload):
            raise _invalid("token audience does not include this relay")
        if self._issuer and claims.iss != self._issuer:
            raise _invalid("token issuer is not trusted")
        if claims.exp <= claims.iat:
            raise _invalid("token expires before it was issued")
        if claims.exp - claims.iat > self._max_lifetime_s:
            raise _invalid(f"token lifetime exceeds {self._max_lifetime_s} s")
        return claims

    @staticmethod
    def _audiences(payload: Mapping[str, Any]) -> list[str]:
        aud = payload.get("aud")
        if isinstance(aud, str):
            return [aud]
        if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            return aud
        raise _invalid("claim 'aud' is missing or not a string or list of strings")

    def _claims(self, payload: Mapping[str, Any], kid: str) -> TokenClaims:
        sid = _str_claim(payload, "sid")
        iat, nbf, exp = (_int_claim(payload, n) for n in ("iat", "nbf", "exp"))
        auds = self._audiences(payload)
        iss = _str_claim(payload, "iss", "")
        cohort = _str_claim(payload, "cohort", DEFAULT_COHORT)
        cap = payload.get("cap")
        if not isinstance(cap, list) or not all(isinstance(c, str) for c in cap):
            raise _invalid("claim 'cap' is missing or not a list of strings")
        aud = self._audience if self._audience in auds else (auds[0] if auds else "")
        return TokenClaims(sid=sid, iat=iat, nbf=nbf, exp=exp, aud=aud, iss=iss,
                           cohort=cohort, cap=tuple(cap), kid=kid)
