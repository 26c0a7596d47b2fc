"""Admission of a WebSocket upgrade request, decided before any byte of the upgrade is sent.

Sans-I/O: the aiohttp glue extracts the few request facts this module needs and turns a
:class:`~rescue.codes.Refusal` into the JSON error response. Checks run cheapest first,
so a flood of bad or excess requests costs no signature verification.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from rescue.codes import ErrorCode, Refusal
from rescue.hello import is_valid_session_id
from rescue.tokens import TokenClaims, TokenVerifier

RETRY_AFTER_OVERLOADED_S = 5
RETRY_AFTER_DRAINING_S = 1


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """The facts of a ``GET /ws`` request that admission looks at."""

    session: str | None
    query_token: str | None
    authorization: str | None
    is_websocket_upgrade: bool


@dataclass(frozen=True, slots=True)
class Load:
    """The worker's state that can refuse a request regardless of who asks."""

    draining: bool
    paused: bool
    connections: int
    handshakes: int
    max_connections: int
    max_handshakes: int


def bearer_token(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def bearer_matches(token: str | None, keys: Sequence[bytes]) -> bool:
    """True if ``token`` (from :func:`bearer_token`) equals one of ``keys``.

    Every key is compared, in constant time, so the time taken does not tell which one
    matched; an empty token never matches.
    """
    candidate = (token or "").encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched and bool(candidate)


def admit(request: UpgradeRequest, load: Load, verifier: TokenVerifier,
          now: float) -> TokenClaims:
    """Return the verified token claims for ``request`` or raise :class:`Refusal`."""
    if load.draining:
        raise Refusal(ErrorCode.DRAINING, "this relay is draining; reconnect shortly",
                      retry_after_s=RETRY_AFTER_DRAINING_S)
    if not request.session or not is_valid_session_id(request.session):
        raise Refusal(ErrorCode.BAD_REQUEST,
                      "query parameter `session` must be 1-128 characters of A-Z a-z 0-9 . _ -")
    if not request.is_websocket_upgrade:
        raise Refusal(ErrorCode.UPGRADE_REQUIRED, "GET /ws requires a WebSocket upgrade")
    token = request.query_token or bearer_token(request.authorization)
    if not token:
        raise Refusal(ErrorCode.TOKEN_MISSING,
                      "pass the token as `token` query parameter or Authorization: Bearer")
    if load.paused:
        raise Refusal(ErrorCode.FALLBACK_PAUSED, "the WebSocket fallback is paused")
    if load.connections >= load.max_connections:
        raise Refusal(ErrorCode.OVERLOADED, "connection limit reached",
                      retry_after_s=RETRY_AFTER_OVERLOADED_S)
    if load.handshakes >= load.max_handshakes:
        raise Refusal(ErrorCode.OVERLOADED, "too many handshakes in progress",
                      retry_after_s=RETRY_AFTER_OVERLOADED_S)
    return verifier.verify(token, request.session, now)
