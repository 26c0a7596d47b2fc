"""A real ``redis-server`` process for tests: start, SIGKILL, restart on the same port.

Redis has no ``--port 0``, so the port is one the OS just reported free (bind port 0,
close, pass it on); a start that loses that race to another process is retried on a new
port. The server keeps nothing on disk (``--save "" --appendonly no``), so a restart
begins empty, like a Redis that lost its data. Readiness is a ``PING`` answered
``+PONG``, polled with a deadline.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.observe import free_port

START_TIMEOUT_S = 10.0
START_ATTEMPTS = 5
POLL_INTERVAL_S = 0.01


def redis_server_binary() -> str | None:
    """The path of ``redis-server`` on ``PATH``, or None when it is not installed."""
    return shutil.which("redis-server")


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """True if a Redis on 127.0.0.1:``port`` answers ``PING`` with ``+PONG`` in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1; :meth:`kill` and :meth:`restart` it."""

    def __init__(self, binary: str, work_dir: Path) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "redis.log"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start on a fresh free port (retried if another process takes it first)."""
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            if self._launch():
                return
        raise RuntimeError(f"redis-server did not start in {START_ATTEMPTS} attempts; "
                           f"log: {self._log_tail()}")

    def restart(self) -> None:
        """Start again on the same port as before (after :meth:`kill`)."""
        assert self.port, "restart() needs a port from an earlier start()"
        assert not self.running, "kill() the server before restarting it"
        # The killed server's listening socket is gone at once (no TIME_WAIT for a
        # listener), so the port is normally free; another process may still take it.
        for _ in range(START_ATTEMPTS):
            if self._launch():
                return
        raise RuntimeError(f"redis-server did not restart on port {self.port}; "
                           f"log: {self._log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone and its port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while ping(self.port, timeout_s=0.2):
            assert time.monotonic() < deadline, f"port {self.port} still answers after kill"
            time.sleep(POLL_INTERVAL_S)

    def stop(self) -> None:
        """Kill the server if it runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT_S)

    def _launch(self) -> bool:
        """Start the process on ``self.port``; True once it answers PING, False if it died."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.work_dir),
             "--logfile", str(self.log_path), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            if ping(self.port):
                return True
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                           f"{START_TIMEOUT_S}s; log: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-10:])
        except OSError:
            return "(no log)"
