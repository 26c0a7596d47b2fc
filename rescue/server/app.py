"""The worker process: listeners, the aiohttp application, signals and drain.

``serve(config)`` runs one worker on its own listening socket (``--workers 1``). The
accept path wraps aiohttp's protocol factory so that a connection which has not sent a
complete request within ``handshake_timeout_s`` is closed (aiohttp itself has no
header timeout, so a slowloris client would otherwise hold a slot forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from rescue import __version__, keys
from rescue.codes import CloseCode, ErrorCode
from rescue.config import Config
from rescue.hello import encode_draining
from rescue.logs import configure_logging, log_event
from rescue.server.admin import admin_app
from rescue.server.relay import Relay, error_response
from rescue.server.sweeper import run_sweeper
from rescue.tokens import TokenVerifier

log = logging.getLogger("rescue.server")

# File descriptors kept free for listeners, logs, key files and the admin listener.
FD_RESERVE = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(relay: Relay, on_request: Callable[[web.Request], None]) -> web.Application:
    """The public application: ``/ws``, ``/healthz``, ``/readyz``; JSON errors elsewhere."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        on_request(request)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error_response(ErrorCode.NOT_FOUND, f"no route for {request.path}")
        except web.HTTPMethodNotAllowed:
            return error_response(ErrorCode.METHOD_NOT_ALLOWED,
                                  f"{request.method} is not allowed on {request.path}")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(_health(relay))

    async def readyz(request: web.Request) -> web.Response:
        body = _health(relay)
        return web.json_response(body, status=503 if relay.draining else 200)

    app = web.Application(middlewares=[json_errors], client_max_size=4096)
    app.router.add_get("/ws", relay.handle_ws)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _health(relay: Relay) -> dict[str, Any]:
    return {
        "status": "draining" if relay.draining else "ok",
        "version": __version__,
        "uptime_s": round(time.time() - relay.started_at, 3),
        "connections": relay.connections,
        "sessions": len(relay.registry),
    }


class HeaderDeadline:
    """Close connections that have not delivered a request within ``timeout_s``."""

    def __init__(self, timeout_s: float, relay: Relay) -> None:
        self.timeout_s = timeout_s
        self.relay = relay
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}

    def wrap(self, factory: Callable[[], RequestHandler]
             ) -> Callable[[], RequestHandler]:
        """Return a protocol factory that arms the deadline for each new connection."""
        loop = asyncio.get_running_loop()

        def make() -> RequestHandler:
            proto = factory()
            self._timers[proto] = loop.call_later(self.timeout_s, self._expire, proto)
            return proto

        return make

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


async def drain(relay: Relay, deadline_s: float, window_s: float = 2.0) -> bool:
    """Tell every peer to reconnect (``draining`` then 1012); wait for them to go.

    Returns True if every peer left before ``deadline_s``.
    """
    relay.draining = True
    peers = list(relay.peers)
    log_event(log, "drain.started", peers=len(peers))
    for peer in peers:
        peer.write_text(encode_draining(int(random.uniform(0, window_s) * 1000)))
        peer.close(CloseCode.SERVER_SHUTDOWN, "draining")
        relay.stats.closes[CloseCode.SERVER_SHUTDOWN.name] += 1
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while relay.peers or relay.handshakes:
        if loop.time() >= end:
            log_event(log, "drain.deadline", left=relay.connections, level=logging.WARNING)
            return False
        await asyncio.sleep(0.05)
    log_event(log, "drain.completed")
    return True


def load_verifier(config: Config) -> TokenVerifier:
    """Build the token verifier from the configured key directory (or development keys)."""
    key_dir = (Path(config.token_keys) if config.token_keys
               else keys.ensure_dev_keys(config.resolved_state_dir()))
    return TokenVerifier.from_config(config, keys.load_public_keys(key_dir))


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the public listening socket (SO_REUSEPORT, so workers can share the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def run_worker(config: Config, verifier: TokenVerifier, sock: socket.socket) -> int:
    """Serve on ``sock`` until SIGTERM (drain, exit 0) or SIGINT (fast exit)."""
    loop = asyncio.get_running_loop()
    relay = Relay(config, verifier)
    deadline = HeaderDeadline(config.handshake_timeout_s, relay)
    app = build_app(relay, deadline.request_started)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=15, shutdown_timeout=config.close_timeout_s)
    await runner.setup()
    assert runner.server is not None
    server = await loop.create_server(deadline.wrap(runner.server), sock=sock, backlog=4096)
    admin_runner = None
    if config.admin_port:
        admin_runner = web.AppRunner(admin_app(relay), access_log=None, handle_signals=False)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, config.admin_host, config.admin_port).start()
    sweeper = loop.create_task(run_sweeper(relay))

    stop = asyncio.Event()
    fast = asyncio.Event()

    def on_term() -> None:
        (fast if stop.is_set() else stop).set()

    def on_int() -> None:
        stop.set()
        fast.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    host, port = sock.getsockname()[:2]
    log_event(log, "relay.listening", host=host, port=port, version=__version__,
              admin_port=config.admin_port or None)
    await stop.wait()
    server.close()
    if not fast.is_set():
        drain_task = loop.create_task(drain(relay, config.drain_timeout_s))
        fast_task = loop.create_task(fast.wait())
        await asyncio.wait({drain_task, fast_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain_task, fast_task):
            task.cancel()
    if fast.is_set():
        for peer in list(relay.peers):
            peer.close(CloseCode.GOING_AWAY, "closed")
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    log_event(log, "relay.stopped", fast=fast.is_set())
    return 0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def serve(config: Config) -> int:
    """Run the relay in this process with ``config``; return the exit status."""
    configure_logging(config.log_level)
    if config.workers != 1:
        print("beach-rescue: --workers > 1 needs the supervisor, which is not part of this "
              "release yet; use --workers 1", file=sys.stderr)
        return 2
    nofile = raise_nofile_limit()
    if config.max_connections > nofile - FD_RESERVE:
        log_event(log, "config.max_connections_clamped", level=logging.WARNING,
                  max_connections=config.max_connections, nofile=nofile,
                  clamped_to=nofile - FD_RESERVE)
        config = msgspec.structs.replace(config, max_connections=max(1, nofile - FD_RESERVE))
    try:
        verifier = load_verifier(config)
        sock = bind_listener(config.host, config.port)
    except (keys.KeyStoreError, OSError) as e:
        print(f"beach-rescue: cannot start: {e}", file=sys.stderr)
        return 1
    return uvloop.run(run_worker(config, verifier, sock))
