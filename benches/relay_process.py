"""The relay under test as a pinned child process: start, health check, CPU/RSS probes, stop.

The relays are ``rescue`` (``python -m rescue serve``, the real relay, one worker, tokens
required), ``rescue<N>`` (the same with ``--workers N``, e.g. ``rescue2``: a supervisor and N
workers that hand foreign sessions to each other) and ``naive`` (:mod:`naive_relay`, the same-run
baseline). CPU and
memory are summed over the relay's whole process tree (a supervisor and its workers count
together).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from bench_host import pin

NAIVE_RELAY = Path(__file__).resolve().with_name("naive_relay.py")


@dataclass(frozen=True)
class RelaySpec:
    """How to start one kind of relay."""

    name: str
    needs_token: bool
    workers: int = 1

    def command(self, port: int, key_dir: str, lifetime_s: float) -> list[str]:
        """Return the argv that serves on 127.0.0.1:``port`` (the naive one for at most
        ``lifetime_s``; the real relay has no such bound and relies on :meth:`RelayProcess.stop`).
        """
        if self.name == "naive":
            return [sys.executable, str(NAIVE_RELAY), "--port", str(port),
                    "--lifetime", str(lifetime_s)]
        if self.name.startswith("rescue"):
            return [sys.executable, "-m", "rescue", "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--workers", str(self.workers), "--token-keys", key_dir]
        raise ValueError(f"unknown relay {self.name!r}")


RELAY_NAMES = "rescue, rescue<N> (N workers, e.g. rescue2, rescue4), naive"
_RESCUE_N = re.compile(r"rescue([1-9][0-9]?)?")


def relay_spec(name: str) -> RelaySpec:
    """Return the spec of relay ``name``: ``rescue`` (1 worker), ``rescue<N>`` (N workers) or
    ``naive``; raise KeyError for any other name."""
    if name == "naive":
        return RelaySpec("naive", needs_token=False)
    match = _RESCUE_N.fullmatch(name)
    if match is None:
        raise KeyError(f"unknown relay {name!r}; known: {RELAY_NAMES}")
    return RelaySpec(name, needs_token=True, workers=int(match.group(1) or 1))


class RelayStartError(RuntimeError):
    """The relay exited or never answered /healthz."""


class RelayProcess:
    """A running relay: its process tree, its log file and its resource usage."""

    def __init__(self, spec: RelaySpec, port: int, *, cpus: list[int] | None, key_dir: str,
                 log_path: Path, env: dict[str, str] | None = None,
                 lifetime_s: float = 3600.0) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        merged_env = dict(os.environ)
        merged_env.update(env or {})
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                spec.command(port, key_dir, lifetime_s), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=merged_env, start_new_session=True,
                cwd=str(Path(__file__).resolve().parent.parent))
        pin(self.proc.pid, cpus)
        self.root = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        """The WebSocket endpoint."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Poll ``GET /healthz`` until it answers 200; return the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RelayStartError(f"{self.spec.name} exited with {self.proc.returncode}: "
                                      f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=1.0) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RelayStartError(f"{self.spec.name} not healthy after {timeout:.0f}s: "
                              f"{self.log_tail()}")

    def tree(self) -> list[psutil.Process]:
        """Return the relay process and all its descendants still alive."""
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """Return user+system CPU seconds used so far by the live process tree."""
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        """Return the resident set size summed over the process tree."""
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return int(total)

    def peak_rss_bytes(self) -> int:
        """Return the peak resident set size (VmHWM) summed over the process tree."""
        total = 0
        for p in self.tree():
            with contextlib.suppress(OSError), open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        return total

    def processes(self) -> int:
        """Return how many processes the relay tree has."""
        return len(self.tree())

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the relay's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """Send SIGTERM, wait up to ``timeout``, then SIGKILL whatever of the tree is left.

        Returns the relay's exit status (None if it could not be reaped).
        """
        started = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for p in started:
            # is_running() compares creation times, so a recycled pid is never signalled.
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None
