"""Wiring of the control plane: its store, keys and verifier from the configuration.

Used in two ways: embedded in a relay worker (the single-machine setup, where worker
slot 0 serves ``/v1`` when there is no Redis), and as the standalone
``beach-rescue control-plane`` process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from rescue import keys, tracing
from rescue.cluster.directory import NodeDirectory
from rescue.cluster.redis_registry import RedisRegistry
from rescue.config import Config, ConfigError
from rescue.controlplane.api import ControlPlane
from rescue.controlplane.entitlement import EntitlementVerifier, load_jwks
from rescue.controlplane.redis_store import RedisStore
from rescue.controlplane.store import MemoryStore, Store
from rescue.logs import configure_logging, log_event

log = logging.getLogger("rescue.controlplane")


def make_store(config: Config) -> Store:
    """A RedisStore when ``redis_url`` is set, else a MemoryStore (call after fork)."""
    if config.redis_url:
        return RedisStore(config.redis_url, timeout_s=config.redis_timeout_s)
    return MemoryStore(pause_file=pause_file(config))


def pause_file(config: Config) -> Path:
    """Where a node without Redis keeps its kill switch (in its state directory)."""
    state_dir = config.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir / "fallback-pause"


def signing_key(config: Config) -> keys.SigningKey:
    """The key the token API signs with; raises ``KeyStoreError``."""
    key_dir = (Path(config.signing_keys) if config.signing_keys
               else keys.ensure_dev_keys(config.resolved_state_dir()))
    return keys.load_signing_key(key_dir)


def entitlement_verifier(config: Config) -> EntitlementVerifier | None:
    """The entitlement proof verifier, or None when no JWKS is configured."""
    if not config.entitlement_jwks:
        return None
    return EntitlementVerifier(load_jwks(config.entitlement_jwks),
                               leeway_s=config.token_leeway_s)


def check(config: Config) -> None:
    """Raise :class:`ConfigError` if the control plane's keys or JWKS cannot be loaded."""
    try:
        signing_key(config)
    except keys.KeyStoreError as e:
        raise ConfigError(f"signing keys: {e}") from None
    try:
        entitlement_verifier(config)
    except ValueError as e:
        raise ConfigError(f"entitlement_jwks: {e}") from None


def node_directory(config: Config) -> NodeDirectory | None:
    """The node registry's view for ``relay_url`` choice when ``registry_redis_url`` is
    set, else None (every token gets the configured ``relay_url``); call after fork."""
    if not config.registry_redis_url:
        return None
    return NodeDirectory(RedisRegistry(config.registry_redis_url,
                                       timeout_s=config.redis_timeout_s),
                         ttl_s=config.registry_ttl_s)


def build(config: Config, store: Store, port: int | None = None) -> ControlPlane:
    """A ready :class:`ControlPlane` over ``store``; ``port`` is the relay's bound port."""
    api = ControlPlane(config, store, signing_key(config), entitlement_verifier(config),
                       directory=node_directory(config))
    if not config.relay_url and port is not None:
        api.relay_url = f"ws://{config.host}:{port}/ws"
    return api


async def _run_standalone(config: Config) -> int:
    store = make_store(config)
    api = build(config, store)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok",
                                  "fallback_paused": (await api.pause.get()).value,
                                  "store_healthy": api.pause.healthy})

    app = web.Application(client_max_size=16384)
    api.add_routes(app)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.port
    log_event(log, "control_plane.listening", host=config.host, port=port,
              store="redis" if config.redis_url else "memory",
              relay_routing="registry" if api.directory is not None else "static")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await store.close()
    await api.close()
    return 0


def serve_control_plane(config: Config) -> int:
    """Run the standalone control plane (one process) until SIGTERM/SIGINT."""
    configure_logging(config.log_level)
    try:
        check(config)
        tracing.setup_tracing(config.otel_endpoint, config.otel_service_name,
                              sample_ratio=config.otel_sample_ratio)
    except (ConfigError, tracing.TracingError) as e:
        print(f"beach-rescue: cannot start: {e}", file=sys.stderr)
        return 1
    try:
        return uvloop.run(_run_standalone(config))
    finally:
        tracing.shutdown_tracing()
