"""The aiohttp application of a worker: routes, JSON errors, and the header deadline.

The protocol factory is wrapped so that a connection which has not delivered a complete
request within ``handshake_timeout_s`` is closed (aiohttp itself has no header timeout,
so a slowloris client would otherwise hold a slot forever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from rescue import __version__, keys
from rescue.codes import ErrorCode
from rescue.config import Config
from rescue.controlplane.api import ControlPlane
from rescue.server.relay import Relay
from rescue.server.responses import error_response, method_not_allowed
from rescue.tokens import TokenVerifier

log = logging.getLogger("rescue.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(relay: Relay, on_request: Callable[[web.Request], None],
              control: ControlPlane | None = None,
              control_elsewhere: bool = False) -> web.Application:
    """The public application: ``/ws``, ``/healthz``, ``/readyz``; JSON errors elsewhere.

    ``control`` mounts the control-plane API; ``control_elsewhere`` answers ``/v1/``
    requests with 503 because another worker slot serves them (a kept-alive connection
    that was routed for another request). There is no middleware: a middleware's frames
    would live as long as every WebSocket connection (about 700 bytes each), so ``/ws``
    is routed directly and everything else goes through one dispatcher.
    """

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(_health(relay))

    async def readyz(request: web.Request) -> web.Response:
        body = _health(relay)
        return web.json_response(body, status=503 if relay.draining else 200)

    routes: dict[str, dict[str, Handler]] = {
        "/healthz": {"GET": healthz, "HEAD": healthz},
        "/readyz": {"GET": readyz, "HEAD": readyz},
    }
    if control is not None:
        for method, path, handler in control.routes():
            routes.setdefault(path, {})[method] = handler

    async def misrouted(request: web.Request) -> web.Response:
        refusal = error_response(ErrorCode.OVERLOADED, "control-plane requests are served "
                                 "by another worker; reconnect on a new connection",
                                 retry_after_s=0)
        refusal.force_close()
        return refusal

    async def dispatch(request: web.Request) -> web.StreamResponse:
        on_request(request)
        methods = routes.get(request.path)
        if methods is None:
            if control_elsewhere and request.path.startswith("/v1/"):
                return await misrouted(request)
            return error_response(ErrorCode.NOT_FOUND, f"no route for {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            return method_not_allowed(request, methods)
        return await handler(request)

    relay.on_request = on_request
    app = web.Application(client_max_size=16384)
    app.router.add_route("*", "/ws", relay.handle_ws)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def _health(relay: Relay) -> dict[str, Any]:
    return {
        "status": "draining" if relay.draining else "ok",
        "version": __version__,
        "uptime_s": round(time.time() - relay.started_at, 3),
        "connections": relay.connections,
        "sessions": len(relay.registry),
        "fallback_paused": relay.pause.value,
    }


class QuietBadRequests(logging.Filter):
    """Turn aiohttp's per-request error tracebacks into one debug event.

    A hostile client can send malformed requests by the thousand; each would otherwise
    be an ERROR line with a traceback. They are answered with 400 either way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = "http.bad_request", None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.fields = {"error": type(exc).__name__ if exc else "unknown"}
        record.exc_info, record.exc_text = None, None
        return logging.getLogger("rescue").isEnabledFor(logging.DEBUG)


def quiet_aiohttp_server_errors() -> None:
    """Install :class:`QuietBadRequests` on aiohttp's server logger (idempotent)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(QuietBadRequests())


class HeaderDeadline:
    """Close connections that have not delivered a request within ``timeout_s``."""

    def __init__(self, timeout_s: float, relay: Relay) -> None:
        self.timeout_s = timeout_s
        self.relay = relay
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}

    def protocol(self, factory: Callable[[], RequestHandler], timeout_s: float | None = None
                 ) -> RequestHandler:
        """Make a protocol with ``factory`` and arm its deadline (``timeout_s`` from now)."""
        proto = factory()
        self._timers[proto] = asyncio.get_running_loop().call_later(
            self.timeout_s if timeout_s is None else max(0.0, timeout_s), self._expire, proto)
        return proto

    def request_started(self, request: web.Request) -> None:
        """Disarm the deadline of the connection carrying ``request``."""
        timer = self._timers.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, proto: RequestHandler) -> None:
        self._timers.pop(proto, None)
        transport = proto.transport
        if transport is not None and not transport.is_closing():
            self.relay.stats.header_timeouts += 1
            transport.close()


def load_verifier(config: Config) -> TokenVerifier:
    """Build the token verifier from the configured key directory (or development keys)."""
    key_dir = (Path(config.token_keys) if config.token_keys
               else keys.ensure_dev_keys(config.resolved_state_dir()))
    return TokenVerifier.from_config(config, keys.load_public_keys(key_dir))
