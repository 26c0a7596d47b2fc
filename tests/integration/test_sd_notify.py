"""systemd notifications: the supervisor tells ``$NOTIFY_SOCKET`` when it is ready, what it
is doing (STATUS=), when a reload starts and ends, when it stops, and pets the watchdog
when ``WATCHDOG_USEC`` asks for it.

The test binds the notification socket itself (an ``AF_UNIX`` datagram socket, as
systemd does) and reads every datagram the relay sends.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.client import TestPeer, join
from tests.support.observe import wait_for_exit
from tests.support.relay import RelayProcess

SETTINGS: dict[str, Any] = {
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 10.0,
    "drain_window_s": 1.0,
    "drain_reconnect_spread_ms": 200,
}
WORKERS = 2
WAIT_S = 15.0
STATUS = re.compile(r"(\d+)/(\d+) workers serving, (\d+) connections, (\d+) sessions"
                    r"(?:, (\d+) draining)?")

Message = dict[str, str]


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock of ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifySocket:
    """The test's stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[Message] = []  # every datagram read so far, in order

    async def wait_for(self, check: Callable[[Message], bool], what: str,
                       within_s: float = WAIT_S) -> Message:
        """Read datagrams until one satisfies ``check`` (earlier unread ones count too)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no notification {what} within {within_s}s; "
                                     f"got {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), remaining)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(message)
            if check(message):
                return message

    def close(self) -> None:
        """Close the socket (the path stays until tmp_path goes)."""
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A bound notification socket in ``tmp_path``."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, f"AF_UNIX path too long: {path}"
    sock = NotifySocket(path)
    yield sock
    sock.close()


def status_counts(message: Message) -> tuple[int, ...] | None:
    """(serving, wanted, connections, sessions) from a STATUS= line, or None."""
    match = STATUS.fullmatch(message.get("STATUS", ""))
    return None if match is None else tuple(int(g) for g in match.groups()[:4])


async def test_ready_status_reloading_and_stopping(relay_factory: Any,
                                                   notify_socket: NotifySocket) -> None:
    relay: RelayProcess = relay_factory(
        workers=WORKERS, env={"NOTIFY_SOCKET": str(notify_socket.path)}, **SETTINGS)

    ready = await notify_socket.wait_for(lambda m: m.get("READY") == "1", "READY=1")
    # Sent once every worker serves, with a status that says so.
    assert status_counts(ready) == (WORKERS, WORKERS, 0, 0), ready
    before_ready = notify_socket.messages[:-1]
    assert all("READY" not in m and "STOPPING" not in m for m in before_ready), before_ready

    # STATUS= lines follow the connections and sessions the workers report.
    peers: list[TestPeer] = []
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            peers.append(await join(http, relay, f"notify-{i}", "host", "h"))
            peers.append(await join(http, relay, f"notify-{i}", "participant", "p"))
        await notify_socket.wait_for(
            lambda m: status_counts(m) == (WORKERS, WORKERS, 6, 3),
            "STATUS= with 6 connections in 3 sessions")

        # HUP: RELOADING=1 with the monotonic time of the reload start, then READY=1.
        sent_at = monotonic_usec()
        relay.proc.send_signal(signal.SIGHUP)
        reloading = await notify_socket.wait_for(lambda m: "RELOADING" in m, "RELOADING=1")
        assert reloading["RELOADING"] == "1"
        assert sent_at <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec(), reloading
        reloaded = await notify_socket.wait_for(lambda m: m.get("READY") == "1",
                                                "READY=1 after the reload")
        assert relay.events("reload.completed"), "READY=1 before the reload completed"
        serving = status_counts(reloaded)
        assert serving is not None and serving[:2] == (WORKERS, WORKERS), reloaded
        for peer in peers:
            await peer.close()

    # TERM: STOPPING=1, then the process exits 0.
    relay.proc.send_signal(signal.SIGTERM)
    await notify_socket.wait_for(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert await wait_for_exit(relay, SETTINGS["drain_timeout_s"] + 2) == 0
    # No watchdog was asked for, so none was petted.
    assert not [m for m in notify_socket.messages if "WATCHDOG" in m]


@pytest.mark.parametrize("watchdog_usec", [
    pytest.param(2_000_000, id="2s"),
    pytest.param(400_000, id="400ms"),
])
async def test_watchdog_is_petted_before_it_expires(relay_factory: Any,
                                                    notify_socket: NotifySocket,
                                                    watchdog_usec: int) -> None:
    interval_s = watchdog_usec / 1e6
    relay_factory(workers=WORKERS, env={"NOTIFY_SOCKET": str(notify_socket.path),
                                        "WATCHDOG_USEC": str(watchdog_usec)}, **SETTINGS)
    await notify_socket.wait_for(lambda m: m.get("READY") == "1", "READY=1")
    loop = asyncio.get_running_loop()
    pets: list[float] = []
    wanted = max(4, int(4 / interval_s))  # a few seconds' worth, at least 4
    while len(pets) < wanted:
        await notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1",
                                     within_s=2 * interval_s + 1)
        pets.append(loop.time())
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(pets)]
    # systemd kills a service whose pets are further apart than WATCHDOG_USEC.
    assert max(gaps) < interval_s, gaps
