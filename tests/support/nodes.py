"""Several relay nodes on 127.0.0.1 for the multi-node tests, and what talks to them.

- :func:`start_nodes`: N ``beach-rescue serve`` processes started in parallel, named
  ``node-0`` ... (``node_id``), each on its own OS-chosen port.
- :func:`proxied_get`: an HTTP request straight to a node that requires the PROXY
  protocol, with a header of the caller's choice.
- :class:`ControlPlaneProcess`: a standalone ``beach-rescue control-plane``.
- :class:`RoutedPeer`: a reconnecting peer that asks the control plane for a token and a
  ``relay_url`` before every connection (control-plane routing, no balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from rescue.keys import SigningKey
from tests.support.reconnecting import ReconnectingPeer
from tests.support.relay import RelayProcess, start_relay

IO_TIMEOUT_S = 10.0


def start_nodes(count: int, key_dir: Path, signing_key: SigningKey, base_dir: Path,
                per_node: dict[int, dict[str, Any]] | None = None,
                **settings: Any) -> list[RelayProcess]:
    """Start ``count`` nodes at once (``node_id`` ``node-<i>``); all or none come up."""
    def one(i: int) -> RelayProcess:
        extra = dict(settings, node_id=f"node-{i}", **(per_node or {}).get(i, {}))
        return start_relay(key_dir, signing_key, base_dir / f"node-{i}", **extra)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
    nodes, errors = [], []
    for future in futures:
        try:
            nodes.append(future.result())
        except Exception as e:  # stop the others, then report
            errors.append(e)
    if errors:
        for node in nodes:
            node.stop()
        raise errors[0]
    return nodes


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def kill_node(node: RelayProcess) -> None:
    """SIGKILL a node's supervisor and workers as a machine dies; return when none of
    them runs any more (an orphaned worker may stay a zombie a while).

    Every process is stopped (SIGSTOP, the supervisor first) before any is killed: a
    worker that saw its supervisor vanish would start a drain (marking itself
    ``draining`` in the registry) before its own SIGKILL, which a dead machine cannot do.
    """
    try:
        procs = [psutil.Process(node.proc.pid), *psutil.Process(node.proc.pid).children()]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGSTOP)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    node.proc.wait(IO_TIMEOUT_S)
    deadline = time.monotonic() + IO_TIMEOUT_S
    while not all(_gone(p) for p in procs):
        assert time.monotonic() < deadline, "a killed node process still runs"
        time.sleep(0.01)


async def proxied_get(port: int, path: str, header: bytes | None
                      ) -> tuple[int, dict[str, Any] | str]:
    """``GET path`` on 127.0.0.1:``port`` preceded by the raw ``header`` (None: none);
    return (status, JSON body or text). A connection closed without an answer is
    status 0."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT_S)
    try:
        writer.write((header or b"") + f"GET {path} HTTP/1.1\r\nHost: node\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
    finally:
        writer.close()
    if not raw:
        return 0, ""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


class ControlPlaneProcess:
    """A standalone control plane on 127.0.0.1 (OS-chosen port) with ``settings``."""

    def __init__(self, state_dir: Path, **settings: Any) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
        env["BEACH_RESCUE_STATE_DIR"] = str(state_dir)
        for name, value in settings.items():
            env["BEACH_RESCUE_" + name.upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rescue", "control-plane", "--host", "127.0.0.1",
             "--port", "0"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.records: list[dict[str, Any]] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self.listening = self._wait_listening()
        except BaseException:
            self.stop()
            raise
        self.port = int(self.listening["port"])

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                self._events.put(record)

    def _wait_listening(self) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                record = self._events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"control plane exited {self.proc.returncode}: "
                                       f"{self.records[-5:]}") from None
                continue
            if record.get("event") == "control_plane.listening":
                return record
        raise TimeoutError("control plane did not listen in time")

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def token(self, http: aiohttp.ClientSession, session_id: str,
                    service_key: str) -> tuple[int, dict[str, Any]]:
        """``POST /v1/fallback/token`` for ``session_id``: (status, JSON body)."""
        async with http.post(self.url("/v1/fallback/token"), json={"session_id": session_id},
                             headers={"Authorization": f"Bearer {service_key}"},
                             timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
            return resp.status, await resp.json()

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 10 s); return the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


class _Route:
    """The relay-like object of one :class:`RoutedPeer`: the URL its last token named."""

    def __init__(self) -> None:
        self.relay_url = ""

    def mint(self, session: str) -> str:
        return ""  # tokens come from the control plane, before each connection

    def ws_url(self, session: str, token: str | None) -> str:
        base = self.relay_url.replace("ws://", "http://", 1)
        return f"{base}?session={session}&token={token}"


class RoutedPeer(ReconnectingPeer):
    """A :class:`ReconnectingPeer` that asks the control plane where to go, every time:
    a fresh token and its ``relay_url`` before each connection attempt, as a Beach client
    does through beach-road after a ``draining`` event. :attr:`urls` lists each attempt's
    URL."""

    def __init__(self, http: aiohttp.ClientSession, session_id: str, role: str,
                 peer_id: str, *, control_plane: ControlPlaneProcess, service_key: str,
                 **kwargs: Any) -> None:
        self.route = _Route()
        super().__init__(http, self.route, session_id, role, peer_id, **kwargs)
        self.control_plane = control_plane
        self.service_key = service_key
        self.urls: list[str] = []

    async def _join_once(self) -> aiohttp.ClientWebSocketResponse:
        status, body = await self.control_plane.token(self.http, self.session_id,
                                                      self.service_key)
        if status != 200:
            raise ConnectionError(f"token API {status}: {body}")
        self.token = body["token"]
        self.route.relay_url = body["relay_url"]
        self.urls.append(body["relay_url"])
        return await super()._join_once()
