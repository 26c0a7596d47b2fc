"""One accept-rate generator process: open WebSocket connections (upgrade + hello) back to back.

Driven by :mod:`accept_load` over JSON lines on stdin/stdout:

1. parent -> child: the configuration (:class:`AcceptConfig`).
2. The child mints one token per connection it may open (a session of its own each, so the
   relay verifies every signature; its cache of verified tokens never helps), pre-builds the
   requests, then sends ``{"event": "ready", ...}``.
3. parent -> child: ``{"cmd": "go", "start_ns", "t0_ns", "t1_ns"}`` (``time.monotonic_ns``).
   From ``start_ns`` on, ``concurrency`` loops each open a connection, wait for its
   ``server_hello``, keep it open and open the next, until ``t1_ns``. Completions inside
   [t0, t1) are counted; CPU of this process is sampled at t0 and t1.
4. child -> parent: ``{"event": "result", ...}``; then it closes its connections and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from time import monotonic_ns
from typing import Any

import uvloop
from bench_child import emit, open_stdin, raise_nofile_limit
from bench_tokens import TokenMinter
from latency_histogram import Histogram
from ws_client import HandshakeError, ResponseHead, WsClient, client_hello, upgrade_request


@dataclass
class AcceptConfig:
    """What one generator process needs."""

    host: str
    port: int
    proc_index: int
    session_prefix: str
    token_keys: str
    kid: str
    connections: int = 6000
    concurrency: int = 32
    connect_timeout_s: float = 10.0
    max_wall_s: float = 120.0


class HelloClient(WsClient):
    """A connection that resolves ``done`` at its ``server_hello`` and then just stays open."""

    def __init__(self, request: bytes, hello: bytes, done: asyncio.Future[None]) -> None:
        super().__init__(request, hello)
        self.done = done
        self.gone: asyncio.Future[None] = done.get_loop().create_future()

    def on_text(self, payload: bytes) -> None:
        """Complete at the server hello."""
        if not self.done.done() and b'"server_hello"' in payload:
            self.done.set_result(None)

    def on_refused(self, head: ResponseHead) -> None:
        """Fail with the HTTP status."""
        if not self.done.done():
            self.done.set_exception(HandshakeError(f"http {head.status} {head.error}".strip()))

    def on_lost(self, exc: Exception | None) -> None:
        """Fail if the connection ended before the hello."""
        if not self.gone.done():
            self.gone.set_result(None)
        if not self.done.done():
            self.done.set_exception(HandshakeError(f"closed {self.close_code} before hello"))


class AcceptGenerator:
    """Opens and holds connections as fast as ``concurrency`` loops allow."""

    def __init__(self, cfg: AcceptConfig) -> None:
        self.cfg = cfg
        self.prepared: list[tuple[bytes, bytes]] = []
        self.next = 0
        self.t0 = self.t1 = 1 << 62
        self.completed_in_window = 0
        self.completed_total = 0
        self.latency_us = Histogram()
        self.failures: dict[str, int] = {}
        self.clients: list[HelloClient] = []
        self.cpu: dict[str, float] = {}

    def prepare(self) -> float:
        """Mint tokens and build requests and hellos; return the seconds it took."""
        start = time.monotonic()
        cfg = self.cfg
        minter = TokenMinter(cfg.token_keys, cfg.kid)
        for i in range(cfg.connections):
            sid = f"{cfg.session_prefix}-p{cfg.proc_index}-{i}"
            self.prepared.append((upgrade_request(cfg.host, cfg.port, sid, minter.mint(sid)),
                                  client_hello(sid, "host", os.urandom(8).hex())))
        return time.monotonic() - start

    def _fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    async def _opener(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        while monotonic_ns() < self.t1 and self.next < len(self.prepared):
            request, hello = self.prepared[self.next]
            self.next += 1
            done: asyncio.Future[None] = loop.create_future()
            started = monotonic_ns()
            client: HelloClient | None = None
            try:
                async with asyncio.timeout(cfg.connect_timeout_s):
                    _, client = await loop.create_connection(
                        lambda r=request, h=hello, d=done: HelloClient(r, h, d),
                        cfg.host, cfg.port)
                    await done
            except HandshakeError as e:
                self._fail(e.reason)
                continue
            except TimeoutError:
                self._fail("timeout")
                if client is not None:
                    client.abort()
                continue
            except OSError as e:
                self._fail(type(e).__name__)
                continue
            end = monotonic_ns()
            self.completed_total += 1
            self.clients.append(client)
            if self.t0 <= end < self.t1:
                self.completed_in_window += 1
                self.latency_us.record((end - started) // 1000)

    def _mark(self, name: str) -> None:
        t = os.times()
        self.cpu[name] = t.user + t.system
        self.cpu[name + "_ns"] = monotonic_ns()

    async def run(self, start_ns: int, t0_ns: int, t1_ns: int) -> None:
        """Open connections from ``start_ns`` to ``t1_ns``."""
        loop = asyncio.get_running_loop()
        self.t0, self.t1 = t0_ns, t1_ns
        now = monotonic_ns()
        loop.call_later(max(0.0, (t0_ns - now) / 1e9), self._mark, "t0")
        loop.call_later(max(0.0, (t1_ns - now) / 1e9), self._mark, "t1")
        await asyncio.sleep(max(0.0, (start_ns - now) / 1e9))
        await asyncio.gather(*(self._opener() for _ in range(self.cfg.concurrency)))
        await asyncio.sleep(max(0.0, (t1_ns - monotonic_ns()) / 1e9) + 0.01)

    def result(self) -> dict[str, Any]:
        """Return the ``result`` event."""
        window_s = (self.cpu.get("t1_ns", 0) - self.cpu.get("t0_ns", 0)) / 1e9
        cpu_s = self.cpu.get("t1", 0.0) - self.cpu.get("t0", 0.0)
        return {"event": "result", "proc": self.cfg.proc_index, "pid": os.getpid(),
                "completed_in_window": self.completed_in_window,
                "completed_total": self.completed_total, "failures": self.failures,
                "exhausted": self.next >= len(self.prepared),
                "latency_us": self.latency_us.to_json(), "cpu_s": cpu_s, "window_s": window_s,
                "cpu_fraction": cpu_s / window_s if window_s > 0 else None}

    async def close_all(self, limit_s: float = 10.0) -> None:
        """Close every held connection (bounded)."""
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        pending = [c.gone for c in self.clients if not c.gone.done()]
        if pending:
            await asyncio.wait(pending, timeout=limit_s)


async def main_async() -> None:
    """Speak the JSON-lines protocol of the module docstring."""
    loop = asyncio.get_running_loop()
    reader = await open_stdin()
    cfg = AcceptConfig(**json.loads(await reader.readline()))
    loop.call_later(cfg.max_wall_s, os._exit, 3)
    gen = AcceptGenerator(cfg)
    emit({"event": "ready", "proc": cfg.proc_index, "prepare_s": gen.prepare()})
    line = await reader.readline()
    if not line:
        return
    command = json.loads(line)
    if command.get("cmd") == "go":
        await gen.run(int(command["start_ns"]), int(command["t0_ns"]), int(command["t1_ns"]))
        emit(gen.result())
    await gen.close_all()


def main() -> None:
    """Entry point of the child process."""
    raise_nofile_limit()
    uvloop.run(main_async())


if __name__ == "__main__":
    main()
