"""Locust runs headless, in its own process, against a real relay on 127.0.0.1.

Locust monkey-patches everything with gevent when imported, so it only ever runs as a
subprocess here (``python -m locust -f load/locustfile.py``); what it did is read back from
its ``--csv`` statistics: request types ``hello``, ``frame``, ``heartbeat``, ``reconnect``
with their names, and the failures file.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.relay import RelayProcess

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "load" / "locustfile.py"
RUN_TIMEOUT_S = 90.0
SESSIONS = 4


@dataclass
class LocustRun:
    """A finished Locust process: its status, its log and its statistics."""

    returncode: int
    log: str
    stats: dict[tuple[str, str], dict[str, str]]
    failures: list[dict[str, str]]

    def count(self, kind: str, name: str) -> int:
        """Entries of this type and name, failed ones included."""
        row = self.stats.get((kind, name))
        return int(row["Request Count"]) if row else 0

    def failed(self, kind: str, name: str) -> int:
        row = self.stats.get((kind, name))
        return int(row["Failure Count"]) if row else 0


def locust_env() -> dict[str, str]:
    """The test's environment without settings that would change the run."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("BEACH_LOAD_", "LOCUST_", "BEACH_RESCUE_"))}


def start_locust(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start Locust headless with ``args``; its output goes to a file (never a full pipe)."""
    log_path = tmp_path / "locust.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "--only-summary", "--csv", str(tmp_path / "run"), *args],
            cwd=REPO, env=locust_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
    return proc, log_path


def finish_locust(proc: subprocess.Popen[bytes], log_path: Path,
                  tmp_path: Path) -> LocustRun:
    """Wait (bounded) for Locust to stop by itself and read what it wrote."""
    try:
        proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(
            f"locust did not stop by itself: {log_path.read_text()[-3000:]}") from None
    stats: dict[tuple[str, str], dict[str, str]] = {}
    failures: list[dict[str, str]] = []
    stats_path = tmp_path / "run_stats.csv"
    if stats_path.exists():
        with stats_path.open() as f:
            stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
        with (tmp_path / "run_failures.csv").open() as f:
            failures = list(csv.DictReader(f))
    return LocustRun(proc.returncode, log_path.read_text(), stats, failures)


def run_locust(tmp_path: Path, *args: str) -> LocustRun:
    proc, log_path = start_locust(tmp_path, *args)
    return finish_locust(proc, log_path, tmp_path)


def target(relay: RelayProcess, key_dir: Path) -> tuple[str, ...]:
    return ("--host", f"ws://127.0.0.1:{relay.port}", "--token-keys", str(key_dir))


def test_active_stream_reports_hellos_and_frame_round_trips(
        relay_factory: Callable[..., RelayProcess], key_dir: Path, tmp_path: Path) -> None:
    relay = relay_factory(heartbeat_s=1.0)
    run = run_locust(
        tmp_path, *target(relay, key_dir), "--shape", "active_stream", "--run-time", "5s",
        "--stream-sessions", str(SESSIONS), "--stream-spawn-rate", str(SESSIONS),
        "--stream-hold-s", "10", "--html", str(tmp_path / "report.html"))

    assert run.returncode == 0, run.log[-3000:]
    assert "stops after 5 s" in run.log  # --run-time cut the 11 s profile
    assert run.count("hello", "host") == run.count("hello", "participant") == SESSIONS
    # 16 data frames/s per session for ~4 s; a loaded machine may deliver fewer, not none.
    assert run.count("frame", "host->participant") >= SESSIONS * 10
    assert run.count("frame", "participant->host") >= SESSIONS
    assert run.count("heartbeat", "rtt") >= SESSIONS
    assert int(run.stats[("", "Aggregated")]["Failure Count"]) == 0
    assert run.failures == []
    host_row = run.stats[("frame", "host->participant")]
    assert int(float(host_row["Average Content Size"])) == 8 + 4096
    html = (tmp_path / "report.html").read_text()  # the statistics are JSON inside the page
    assert any(f"host{arrow}participant" in html for arrow in ("->", "-&gt;", "-\\u003e"))


def test_reconnect_storm_brings_every_peer_back(
        relay_factory: Callable[..., RelayProcess], key_dir: Path, tmp_path: Path) -> None:
    relay = relay_factory(heartbeat_s=1.0)
    run = run_locust(
        tmp_path, *target(relay, key_dir), "--shape", "reconnect_storm",
        "--storm-sessions", str(SESSIONS), "--storm-spawn-rate", str(SESSIONS),
        "--storm-settle-s", "3", "--storm-count", "1", "--storm-every-s", "4",
        "--storm-spread-ms", "300")

    assert run.returncode == 0, run.log[-3000:]
    assert "reconnect storm 1: dropped 4 sessions" in run.log
    assert run.count("reconnect", "storm") == 2 * SESSIONS  # host and participant each
    assert run.count("hello", "host") == SESSIONS
    assert run.failures == [], run.failures


def test_draining_relay_is_followed_after_reconnect_after_ms(
        relay_factory: Callable[..., RelayProcess], key_dir: Path, tmp_path: Path) -> None:
    relay = relay_factory(heartbeat_s=1.0, drain_window_s=0.5,
                          drain_reconnect_spread_ms=300, drain_timeout_s=10.0)
    proc, log_path = start_locust(
        tmp_path, *target(relay, key_dir), "--shape", "idle_hold",
        "--idle-sessions", str(SESSIONS), "--idle-spawn-rate", str(SESSIONS),
        "--idle-hold-s", "12")
    try:
        for _ in range(2 * SESSIONS):
            relay.wait_for_event("hello.accepted", 30.0)
        relay.proc.send_signal(signal.SIGHUP)  # reload: the old workers drain their peers
        relay.wait_for_event("drain.completed", 30.0)
    finally:
        run = finish_locust(proc, log_path, tmp_path)

    # A reconnect may meet the reload half-way (503 draining) and retry; every peer must
    # be back exactly once, and no connection may be lost for any other reason.
    assert run.returncode in (0, 1), run.log[-3000:]
    back = run.count("reconnect", "draining") - run.failed("reconnect", "draining")
    assert back == 2 * SESSIONS, run.stats
    assert run.failed("connection", "host") == run.failed("connection", "participant") == 0
    assert run.failed("hello", "host") == run.failed("hello", "participant") == 0


# 192.0.2.1 is TEST-NET-1 (RFC 5737): nothing answers there, and nothing may be sent.
@pytest.mark.parametrize(("args", "refused"), [
    (("--host", "ws://192.0.2.1:9443"), "relay host '192.0.2.1' is not in 127.0.0.0/8"),
    (("--host", "ws://[::ffff:192.0.2.1]:9443"), "is not in 127.0.0.0/8"),
    (("--host", "ws://127.0.0.1.example.net:9443"), "is not in 127.0.0.0/8"),
    (("--host", "ws://127.0.0.1:9443", "--control-plane", "http://192.0.2.1:8080",
      "--service-key", "k"), "control plane '192.0.2.1' is not in 127.0.0.0/8"),
])
def test_a_target_outside_loopback_is_refused_before_any_connection(
        tmp_path: Path, args: tuple[str, ...], refused: str) -> None:
    run = run_locust(tmp_path, *args, "--shape", "idle_hold")
    assert run.returncode == 2
    assert refused in run.log
    assert "--allow-remote" in run.log
    assert "Shape test starting" not in run.log
    assert run.count("hello", "host") == 0


def test_bad_settings_stop_locust_at_start(tmp_path: Path, key_dir: Path) -> None:
    run = run_locust(tmp_path, "--host", "ws://127.0.0.1:9", "--token-keys", str(key_dir),
                     "--shape", "idle_hold", "--idle-sessions", "0")
    assert run.returncode == 2
    assert "BEACH_LOAD_IDLE_SESSIONS='0' is outside 1..100000" in run.log
    assert "Shape test starting" not in run.log
