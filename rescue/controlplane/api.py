"""The control-plane HTTP API (protocol section 7) as an aiohttp application.

- ``POST /v1/fallback/token``: a service (bearer service key) asks for a relay token for a
  session; the guardrail counts it; the kill switch and the entitlement proof can refuse.
- ``POST /v1/sessions``: a service counts a session created (the guardrail denominator).
- ``POST /v1/admin/pause`` / ``resume``: the kill switch (bearer admin key).
- ``GET /v1/status``: the kill switch and this hour's guardrail numbers per asked cohort.

Every refusal is the contract's JSON error body. Tokens never reach the logs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from rescue import metrics, tracing
from rescue.admission import bearer_matches, bearer_token
from rescue.cluster.directory import NodeDirectory
from rescue.cluster.registry import RegistryUnavailable
from rescue.config import Config
from rescue.controlplane.entitlement import EntitlementError, EntitlementVerifier
from rescue.controlplane.guardrail import BreachLog, GuardrailState, evaluate
from rescue.controlplane.store import Pause, Store, StoreUnavailable
from rescue.hello import is_valid_session_id
from rescue.keys import SigningKey
from rescue.logs import log_event
from rescue.ratelimit import TokenBucket
from rescue.tokens import CAP_FALLBACK_WS, CAP_TELEMETRY, mint_token

log = logging.getLogger("rescue.controlplane")

MAX_TRACKED_SESSIONS = 100_000


class TokenRequest(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/fallback/token``."""

    session_id: str
    cohort_id: str = "public"
    client_version: str = ""
    entitlement_proof: str | None = None
    telemetry_opt_in: bool = False


class SessionRequest(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/sessions``."""

    cohort_id: str = "public"
    session_id: str | None = None


class PauseRequest(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/admin/pause`` (optional)."""

    hard: bool = False


def api_error(status: int, error: str, detail: str,
              retry_after_s: int | None = None) -> web.Response:
    """The contract's JSON error response."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": error, "detail": detail}, status=status,
                             headers=headers)


def rfc3339(ts: float) -> str:
    """``ts`` (unix seconds) as an RFC 3339 UTC timestamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class PauseCache:
    """The kill switch as read from the store, cached for ``ttl_s``; the config overrides.

    When the store cannot be read the last known state is kept (the relay keeps its
    behaviour through a Redis outage).
    """

    def __init__(self, store: Store, ttl_s: float, forced: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.forced = forced
        self.clock = clock
        self.state = Pause.OFF
        self.fetched_at = float("-inf")
        self.healthy = True

    async def get(self) -> Pause:
        """The current kill switch (SOFT at least when forced by configuration)."""
        now = self.clock()
        if now - self.fetched_at >= self.ttl_s:
            self.fetched_at = now
            try:
                self.state = await self.store.pause_state()
                self.healthy = True
            except StoreUnavailable:
                self.healthy = False
        if self.forced and self.state is Pause.OFF:
            return Pause.SOFT
        return self.state

    def invalidate(self) -> None:
        """Forget the cached value (after this process changed the switch)."""
        self.fetched_at = float("-inf")


class _Buckets:
    """Token buckets by key, bounded (least recently used dropped)."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(1, now)


class ControlPlane:
    """The token API's state and handlers."""

    def __init__(self, config: Config, store: Store, signing_key: SigningKey,
                 entitlement: EntitlementVerifier | None,
                 clock: Callable[[], float] = time.time, *,
                 directory: NodeDirectory | None = None) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.signing_key = signing_key
        self.entitlement = entitlement
        self.clock = clock
        self.service_keys = [k.strip().encode() for k in config.service_keys.split(",")
                             if k.strip()]
        self.admin_key = config.admin_key.encode()
        self.pause = PauseCache(store, config.pause_poll_s, config.fallback_paused)
        self.breaches = BreachLog()
        per_min = config.mint_rate_per_session_per_min
        self.session_buckets = _Buckets(per_min / 60.0, per_min, MAX_TRACKED_SESSIONS)
        per_s = config.mint_rate_per_service_key_per_s
        self.service_buckets = _Buckets(per_s, per_s * 2, 1024)
        self.relay_url = config.relay_url or f"ws://{config.host}:{config.port}/ws"
        self.exempt_cohorts = frozenset(
            c.strip() for c in config.guardrail_exempt_cohorts.split(",") if c.strip())

    # --- helpers ---------------------------------------------------------------------
    def _refuse(self, status: int, error: str, detail: str,
                retry_after_s: int | None = None) -> web.Response:
        metrics.TOKEN_REQUESTS.labels(error).inc()
        if error == "store_unavailable":
            metrics.STORE_ERRORS.inc()
        log_event(log, "token_api.refused", error=error, detail=detail)
        return api_error(status, error, detail, retry_after_s)

    def _service(self, request: web.Request) -> str | None:
        token = bearer_token(request.headers.get("Authorization"))
        return token if bearer_matches(token, self.service_keys) else None

    def _is_admin(self, request: web.Request) -> bool:
        token = bearer_token(request.headers.get("Authorization"))
        return bool(self.admin_key) and bearer_matches(token, [self.admin_key])

    async def _body(self, request: web.Request, kind: type[Any]) -> Any:
        raw = await request.read()
        try:
            return msgspec.json.decode(raw or b"{}", type=kind)
        except msgspec.ValidationError as e:
            raise _BadBody(str(e)) from None
        except msgspec.DecodeError:
            raise _BadBody("body is not a JSON object") from None

    # --- handlers --------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        """``POST /v1/fallback/token``, traced as one ``token.mint`` span."""
        with tracing.span("token.mint") as trace:
            response = await self._token(request, trace)
            trace.set_attribute("http_status", response.status)
            return response

    async def _token(self, request: web.Request, trace: tracing.Span) -> web.Response:
        service = self._service(request)
        if service is None:
            return self._refuse(401, "unauthenticated", "a valid service key is required")
        now = self.clock()
        if not self.service_buckets.allow(service, now):
            return self._refuse(429, "rate_limited", "too many token requests for this "
                                "service key", retry_after_s=1)
        try:
            body: TokenRequest = await self._body(request, TokenRequest)
        except _BadBody as e:
            return self._refuse(400, "invalid_request", e.detail)
        if not is_valid_session_id(body.session_id):
            return self._refuse(400, "invalid_session_id",
                                "session_id must be 1-128 characters of A-Z a-z 0-9 . _ -")
        if not is_valid_session_id(body.cohort_id) or len(body.cohort_id) > 64:
            return self._refuse(400, "invalid_request",
                                "cohort_id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if not self.session_buckets.allow(body.session_id, now):
            return self._refuse(429, "rate_limited", "too many tokens for this session",
                                retry_after_s=60)
        if await self.pause.get() is not Pause.OFF:
            return self._refuse(403, "fallback_paused", "the WebSocket fallback is paused")
        if self.entitlement is not None and not self.config.disable_oidc:
            if not body.entitlement_proof:
                return self._refuse(403, "entitlement_missing",
                                    "entitlement_proof is required")
            try:
                self.entitlement.verify(body.entitlement_proof, now)
            except EntitlementError as e:
                if e.missing:
                    return self._refuse(403, "entitlement_missing", e.detail)
                return self._refuse(401, "entitlement_invalid", e.detail)
        relay_url = await self._relay_url(body.session_id, trace)
        if relay_url is None:
            return self._refuse(503, "store_unavailable", "no relay node is registered as "
                                "active, or the node registry is unreachable",
                                retry_after_s=5)
        guardrail: dict[str, Any]
        if body.cohort_id in self.exempt_cohorts:
            guardrail = {"ratio": None, "soft_breach": False, "exempt": True}
            return self._issue(body, now, relay_url, guardrail, trace)
        try:
            fallback, total = await self.store.count_fallback(body.cohort_id, now)
        except StoreUnavailable as e:
            if not self.config.store_fail_open:
                log_event(log, "store.unavailable", level=logging.WARNING, detail=str(e))
                return self._refuse(503, "store_unavailable",
                                    "the guardrail store is unreachable", retry_after_s=5)
            metrics.STORE_ERRORS.inc()
            guardrail = {"ratio": None, "soft_breach": False, "uncounted": True}
        else:
            state = evaluate(fallback, total, threshold=self.config.guardrail_threshold,
                             hard_threshold=self.config.guardrail_hard_threshold,
                             hard_min_sessions=self.config.guardrail_hard_min_sessions)
            if state.hard_breach:
                return await self._auto_pause(body.cohort_id, state)
            self._note_breach(body.cohort_id, state, now)
            guardrail = {"ratio": round(state.ratio, 6), "soft_breach": state.soft_breach}
        return self._issue(body, now, relay_url, guardrail, trace)

    def _issue(self, body: TokenRequest, now: float, relay_url: str,
               guardrail: dict[str, Any], trace: tracing.Span) -> web.Response:
        """Mint the token and answer with it, counting it under its guardrail state."""
        state = ("exempt" if guardrail.get("exempt") else
                 "uncounted" if guardrail.get("uncounted") else
                 "soft_breach" if guardrail["soft_breach"] else "ok")
        caps = [CAP_FALLBACK_WS] + ([CAP_TELEMETRY] if body.telemetry_opt_in else [])
        ttl = self.config.token_ttl_s
        token = mint_token(self.signing_key, session_id=body.session_id, now=now,
                           ttl_s=ttl, cohort=body.cohort_id, caps=caps,
                           issuer="beach-rescue-control-plane",
                           audience=self.config.token_audience)
        trace.set_attribute("ttl_s", ttl)
        trace.set_attribute("telemetry", body.telemetry_opt_in)
        trace.set_attribute("guardrail", state)
        metrics.TOKEN_REQUESTS.labels("issued").inc()
        metrics.TOKENS_ISSUED.labels(state).inc()
        return web.json_response({
            "token": token, "expires_at": rfc3339(int(now) + ttl), "cohort": body.cohort_id,
            "relay_url": relay_url, "guardrail": guardrail})

    async def _relay_url(self, session_id: str, trace: tracing.Span) -> str | None:
        """The node URL for ``session_id``: with a node registry, the active node that
        owns the session (rendezvous hash, as the workers route to slots); without one,
        the configured ``relay_url``. None when the registry has no answer."""
        if self.directory is None:
            return self.relay_url
        try:
            node = await self.directory.owner(session_id)
        except RegistryUnavailable as e:
            log_event(log, "registry.unavailable", level=logging.WARNING, detail=str(e))
            return None
        if node is None:
            log_event(log, "registry.no_active_node", level=logging.WARNING)
            return None
        trace.set_attribute("relay_node", node.node_id)
        return node.url

    async def close(self) -> None:
        """Release the node directory's connections (the store is closed by its owner)."""
        if self.directory is not None:
            await self.directory.close()

    def _note_breach(self, cohort: str, state: GuardrailState, now: float) -> None:
        if state.soft_breach and self.breaches.first(cohort, now):
            metrics.SOFT_BREACHES.inc()
            log_event(log, "guardrail_soft_breach", level=logging.WARNING, cohort=cohort,
                      ratio=round(state.ratio, 6), fallback=state.fallback,
                      total=state.total, threshold=self.config.guardrail_threshold)

    async def _auto_pause(self, cohort: str, state: GuardrailState) -> web.Response:
        with contextlib.suppress(StoreUnavailable):  # the refusal below holds regardless
            await self.store.set_pause(Pause.SOFT)
        self.pause.invalidate()
        log_event(log, "guardrail_auto_paused", level=logging.ERROR, cohort=cohort,
                  ratio=round(state.ratio, 6),
                  hard_threshold=self.config.guardrail_hard_threshold)
        return self._refuse(403, "fallback_paused",
                            "the fallback paused itself: the guardrail's hard threshold "
                            "was reached")

    async def sessions(self, request: web.Request) -> web.Response:
        """``POST /v1/sessions``: count one session created in a cohort."""
        if self._service(request) is None:
            return self._refuse(401, "unauthenticated", "a valid service key is required")
        try:
            body: SessionRequest = await self._body(request, SessionRequest)
        except _BadBody as e:
            return self._refuse(400, "invalid_request", e.detail)
        if body.session_id is not None and not is_valid_session_id(body.session_id):
            return self._refuse(400, "invalid_session_id",
                                "session_id must be 1-128 characters of A-Z a-z 0-9 . _ -")
        if not is_valid_session_id(body.cohort_id) or len(body.cohort_id) > 64:
            return self._refuse(400, "invalid_request",
                                "cohort_id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        try:
            total = await self.store.count_session(body.cohort_id, self.clock())
        except StoreUnavailable:
            return self._refuse(503, "store_unavailable", "the guardrail store is unreachable",
                                retry_after_s=5)
        metrics.SESSIONS_COUNTED.inc()
        return web.json_response({"cohort": body.cohort_id, "sessions_this_hour": total})

    async def set_pause(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/pause`` (``{"hard": true}`` also closes existing sessions)."""
        if not self._is_admin(request):
            return self._refuse(401, "unauthenticated", "the admin key is required")
        try:
            body: PauseRequest = await self._body(request, PauseRequest)
        except _BadBody as e:
            return self._refuse(400, "invalid_request", e.detail)
        return await self._switch(Pause.HARD if body.hard else Pause.SOFT)

    async def resume(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/resume``."""
        if not self._is_admin(request):
            return self._refuse(401, "unauthenticated", "the admin key is required")
        return await self._switch(Pause.OFF)

    async def _switch(self, pause: Pause) -> web.Response:
        try:
            await self.store.set_pause(pause)
        except StoreUnavailable:
            return self._refuse(503, "store_unavailable", "the kill switch store is "
                                "unreachable", retry_after_s=5)
        self.pause.invalidate()
        log_event(log, "kill_switch.changed", level=logging.WARNING, state=pause.value)
        effective = await self.pause.get()
        return web.json_response({"paused": effective.value,
                                  "forced_by_config": self.config.fallback_paused})

    async def status(self, request: web.Request) -> web.Response:
        """``GET /v1/status``: the kill switch and whether the store answers."""
        effective = await self.pause.get()
        return web.json_response({"paused": effective.value,
                                  "store_healthy": self.pause.healthy,
                                  "forced_by_config": self.config.fallback_paused})

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]]:
        """The API's ``(method, path, handler)`` routes."""
        return [("POST", "/v1/fallback/token", self.token),
                ("POST", "/v1/sessions", self.sessions),
                ("POST", "/v1/admin/pause", self.set_pause),
                ("POST", "/v1/admin/resume", self.resume),
                ("GET", "/v1/status", self.status),
                ("HEAD", "/v1/status", self.status)]

    def add_routes(self, app: web.Application) -> None:
        """Mount the API's routes on ``app`` (the standalone control plane)."""
        for method, path, handler in self.routes():
            if method != "HEAD":
                app.router.add_route(method, path, handler)


class _BadBody(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
