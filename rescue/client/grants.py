"""Where a client's relay token comes from: given once, or fetched from the control plane.

A :class:`Grant` is a token plus what came with it (the relay URL to use, its expiry and
the guardrail's verdict). A channel asks its :class:`TokenSource` for a grant before each
connection attempt; a control-plane source reuses a grant until shortly before it expires,
and fetches a fresh one when the relay says the token expired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp

from rescue.client.errors import ChannelError, FallbackPaused

_REFRESH_MARGIN_S = 30.0
_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Grant:
    """A token for one session and the relay it is meant for."""

    token: str
    relay_url: str | None = None
    expires_at: float | None = None  # unix time
    soft_breach: bool = False


class TokenSource(Protocol):
    """Hands out grants; ``fresh=True`` demands a new token (the last one expired)."""

    async def grant(self, *, fresh: bool = False) -> Grant:
        """A grant valid now, fetched anew when ``fresh`` or when the cached one is stale."""
        ...


class ControlPlaneError(ChannelError):
    """The control plane refused to issue a token (status and its JSON error code)."""

    def __init__(self, status: int, error: str, detail: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"control plane refused a token: {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s  # the answer's Retry-After, if it had one


class StaticToken:
    """A token given by the caller; it cannot be renewed."""

    def __init__(self, token: str, relay_url: str | None = None) -> None:
        self._grant = Grant(token=token, relay_url=relay_url)

    async def grant(self, *, fresh: bool = False) -> Grant:
        """The same grant every time (``fresh`` cannot be honoured)."""
        return self._grant


class ControlPlaneTokens:
    """Fetches tokens with ``POST /v1/fallback/token`` using a service key."""

    def __init__(self, base_url: str, service_key: str, session_id: str, *,
                 cohort_id: str = "public", client_version: str = "",
                 entitlement_proof: str | None = None, telemetry_opt_in: bool = False,
                 http: aiohttp.ClientSession | None = None) -> None:
        self._url = base_url.rstrip("/") + "/v1/fallback/token"
        self._headers = {"Authorization": f"Bearer {service_key}"}
        self._body: dict[str, Any] = {
            "session_id": session_id, "cohort_id": cohort_id, "client_version": client_version,
            "telemetry_opt_in": telemetry_opt_in}
        if entitlement_proof is not None:
            self._body["entitlement_proof"] = entitlement_proof
        self._http = http
        self._cached: Grant | None = None

    async def grant(self, *, fresh: bool = False) -> Grant:
        """A cached grant while it has over 30 s to live, else a newly fetched one.

        Raises :class:`FallbackPaused` when the kill switch is on and
        :class:`ControlPlaneError` for any other refusal.
        """
        cached = self._cached
        if (not fresh and cached is not None and cached.expires_at is not None
                and cached.expires_at - time.time() > _REFRESH_MARGIN_S):
            return cached
        self._cached = await self._fetch()
        return self._cached

    async def _fetch(self) -> Grant:
        http = self._http or aiohttp.ClientSession()
        try:
            async with http.post(self._url, json=self._body, headers=self._headers,
                                 timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S)) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = {}
                if not isinstance(body, dict):
                    body = {}
                if resp.status != 200:
                    error = str(body.get("error", "unknown"))
                    detail = str(body.get("detail", resp.reason or ""))
                    if resp.status == 403 and error == "fallback_paused":
                        raise FallbackPaused(4008, "fallback_paused")
                    retry = resp.headers.get("Retry-After", "")
                    raise ControlPlaneError(resp.status, error, detail,
                                            float(retry) if retry.isdigit() else None)
        finally:
            if self._http is None:
                await http.close()
        return grant_from_response(body)


def grant_from_response(body: dict[str, Any]) -> Grant:
    """Read the token API's JSON answer; ControlPlaneError when it lacks a token."""
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise ControlPlaneError(200, "bad_response", "the answer carries no token")
    expires_at: float | None = None
    raw = body.get("expires_at")
    if isinstance(raw, str):
        try:
            expires_at = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            expires_at = None
    guardrail = body.get("guardrail")
    soft = bool(guardrail.get("soft_breach")) if isinstance(guardrail, dict) else False
    relay = body.get("relay_url")
    return Grant(token=token, relay_url=relay if isinstance(relay, str) else None,
                 expires_at=expires_at, soft_breach=soft)
