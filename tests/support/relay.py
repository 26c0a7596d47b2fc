"""Start a real ``beach-rescue serve`` process for tests and talk about it.

The process binds port 0; the port is read from its ``relay.listening`` log line. Its
stderr (JSON lines) is drained by a thread into :attr:`RelayProcess.lines`, so tests can
assert on log events and the pipe never fills up.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rescue.keys import SigningKey
from rescue.tokens import mint_token

START_TIMEOUT_S = 20.0


class RelayProcess:
    """A running relay subprocess: its port, its logs, tokens for it, and stopping it."""

    def __init__(self, proc: subprocess.Popen[bytes], signing_key: SigningKey,
                 settings: Mapping[str, Any]) -> None:
        self.proc = proc
        self.signing_key = signing_key
        self.settings = dict(settings)
        self.lines: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        listening = self.wait_for_event("relay.listening", START_TIMEOUT_S)
        self.port: int = listening["port"]
        self.admin_port: int | None = listening.get("admin_port")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._events.put(record)

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """Block until a log record with ``event`` arrives; raise if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} log event within {timeout}s; "
                                   f"stderr: {self.lines[-20:]}")
            try:
                record = self._events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and not self._thread.is_alive():
                    raise RuntimeError(f"relay exited with {self.proc.returncode} before "
                                       f"{event!r}; stderr: {self.lines[-20:]}") from None
                continue
            if record.get("event") == event:
                return record

    def events(self, event: str) -> list[dict[str, Any]]:
        """All log records seen so far with this ``event`` name."""
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
        return out

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, session: str, token: str | None) -> str:
        url = f"http://127.0.0.1:{self.port}/ws?session={session}"
        return url + (f"&token={token}" if token is not None else "")

    def mint(self, session: str, *, ttl_s: int = 300, now: float | None = None,
             **claims: Any) -> str:
        """A token for ``session`` signed by the test key (extra kwargs go to mint_token)."""
        return mint_token(self.signing_key, session_id=session,
                          now=time.time() if now is None else now, ttl_s=ttl_s, **claims)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for exit (SIGKILL after ``timeout``); return the status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def start_relay(key_dir: Path, signing_key: SigningKey, state_dir: Path, *,
                env: Mapping[str, str] | None = None, **settings: Any) -> RelayProcess:
    """Start ``beach-rescue serve`` on 127.0.0.1:0 with ``settings`` as BEACH_RESCUE_* env.

    ``env`` adds other environment variables (e.g. ``NOTIFY_SOCKET``) to the process.
    """
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    process_env.update(env or {})
    process_env["BEACH_RESCUE_STATE_DIR"] = str(state_dir)
    settings = dict(settings)
    for name, value in settings.items():
        process_env["BEACH_RESCUE_" + name.upper()] = (
            str(value).lower() if isinstance(value, bool) else str(value))
    workers = str(settings.pop("workers", 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rescue", "serve", "--host", "127.0.0.1", "--port", "0",
         "--workers", workers, "--token-keys", str(key_dir)],
        env=process_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        return RelayProcess(proc, signing_key, settings)
    except BaseException:
        proc.kill()
        proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
        raise
