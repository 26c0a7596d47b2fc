"""Shared fixtures: a test signing key and real relay processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.keys import SigningKey, generate_keypair, load_signing_key
from tests.support.redis import RedisServer, redis_server_binary
from tests.support.relay import RelayProcess, start_relay

# Settings that make liveness and flow-control behaviour observable in seconds.
FAST_SETTINGS: dict[str, Any] = {
    "heartbeat_s": 1.0,
    "session_grace_s": 1.0,
    "slow_consumer_timeout_s": 2.0,
    "close_timeout_s": 1.0,
    "handshake_timeout_s": 2.0,
    "log_level": "debug",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the chaos options here, not in tests/chaos/conftest.py (which uses them):
    an option defined in a subdirectory's conftest is unknown unless that directory is
    named on the command line, so ``pytest tests --chaos-long`` would be refused."""
    group = parser.getgroup("chaos", "chaos and soak tests (tests/chaos)")
    group.addoption("--chaos-long", action="store_true", default=False,
                    help="run the long chaos run (5 min) and the 30-minute soak")
    group.addoption("--chaos-seed", type=int, default=None,
                    help="seed of the chaos schedule (default: a fresh one, printed)")


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    generate_keypair(path)
    return path


@pytest.fixture(scope="session")
def signing_key(key_dir: Path) -> SigningKey:
    return load_signing_key(key_dir)


@pytest.fixture
def relay_factory(key_dir: Path, signing_key: SigningKey,
                  tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays with given settings; every one is stopped at teardown."""
    started: list[RelayProcess] = []

    def start(**settings: Any) -> RelayProcess:
        relay = start_relay(key_dir, signing_key, tmp_path / f"state{len(started)}",
                            **settings)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture(scope="module")
def relay(key_dir: Path, signing_key: SigningKey,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay with FAST_SETTINGS shared by a test module."""
    proc = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("state"),
                       **FAST_SETTINGS)
    yield proc
    proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty ``redis-server`` on a free port; tests may kill and restart it."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (needed for the Redis store tests)")
    work_dir = tmp_path / "redis"
    work_dir.mkdir()
    server = RedisServer(binary, work_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def fresh_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection per request, so each one is routed afresh
    (requests reach every worker of a multi-worker node)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        yield http
