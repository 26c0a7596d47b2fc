"""The machine the benches run on: CPU pinning, free ports, and a description for the results."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def pin(pid: int, cpus: Iterable[int] | None) -> None:
    """Pin process ``pid`` (0: the caller) to ``cpus``; None or empty leaves it alone.

    Children started right before are pinned before they do any measured work (Python is still
    starting up); whatever they fork later inherits the affinity. This avoids ``preexec_fn``,
    which is unsafe in a process with threads (asyncio's child watcher has one).
    """
    wanted = set(cpus or ())
    if wanted:
        os.sched_setaffinity(pid, wanted)


def pin_self(cpus: Iterable[int] | None) -> None:
    """Pin the calling process to ``cpus`` when given."""
    pin(0, cpus)


def system_busy_seconds() -> float:
    """Return the machine's busy CPU seconds so far, all CPUs (/proc/stat: user, nice, system,
    irq, softirq; idle, iowait and steal left out)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """Return user+system CPU seconds of this process and every live descendant."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class ForeignCpu:
    """Measures CPU used on the machine by processes that are not this bench's own.

    Busy time from /proc/stat minus the CPU of this process and its descendants (the relay and
    the generators). With tick-based accounting (no ``CONFIG_IRQ_TIME_ACCOUNTING``) softirq
    time is charged to the interrupted task too, so both sides contain it; where IRQ time is
    accounted apart, our own softirq work shows up here and the figure leans high.
    """

    def __init__(self) -> None:
        self.busy0 = system_busy_seconds()
        self.own0 = own_cpu_seconds()

    def seconds(self) -> float:
        """Return foreign CPU seconds since construction (never negative)."""
        busy = system_busy_seconds() - self.busy0
        own = own_cpu_seconds() - self.own0
        return max(0.0, busy - own)


def wait_for_quiet(threshold_cores: float = 0.1, max_wait_s: float = 60.0) -> float:
    """Wait (bounded) until foreign CPU over one second is below ``threshold_cores``.

    Returns the foreign load of the last second, in cores; call it while nothing of the bench
    is busy.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = ForeignCpu()
        time.sleep(1.0)
        load = probe.seconds()
        if load < threshold_cores or time.monotonic() >= deadline:
            return load


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ephemeral_ports() -> int:
    """Return how many local ports the kernel hands out per source address (default range:
    28,232), from ``/proc/sys/net/ipv4/ip_local_port_range``."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return 28232
    return high - low + 1


def loopback_sources(connections: int, count: int = -1) -> list[str]:
    """Return the source addresses a generator binds to: 127.0.0.2, 127.0.0.3, ...

    ``count`` 0 binds none; -1 binds none while one address suffices (up to 70 % of the
    ephemeral ports: ``connect()`` picks the port by the whole 4-tuple, cheaply) and otherwise
    enough addresses that each carries at most a quarter of the ephemeral ports: a ``bind()``
    to port 0 searches the port range (odd ports first) for a free one, which gets slow, and
    the generator CPU-bound, as an address fills up. Linux routes all of 127.0.0.0/8 to the
    loopback interface, so nothing needs setting up; each address has its own ~28k ports to
    reach one server port with.
    """
    if count < 0:
        ports = ephemeral_ports()
        count = 0 if connections <= int(ports * 0.7) else -(-connections // (ports // 4))
    if count > 250:
        raise ValueError("at most 250 loopback source addresses (127.0.0.2-127.0.0.251)")
    return [f"127.0.0.{2 + i}" for i in range(count)]


def parse_cpus(text: str) -> list[int]:
    """Parse ``"1"`` or ``"0,1"`` into a list of CPU numbers (empty string: no pinning)."""
    return [int(part) for part in text.split(",") if part.strip()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """Run a read-only git command in the repository; None when git is unavailable."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_revision() -> dict[str, Any]:
    """Return the git revision of the checkout and whether ``rescue/`` or ``supervisor/`` have
    uncommitted changes (the relay under test is started from the working tree)."""
    return {"git_revision": _git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--", "rescue", "supervisor"))}


def describe_machine() -> dict[str, Any]:
    """Return CPU model, core count, kernel, limits and library versions."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in
                     ("aiohttp", "uvloop", "picows", "psutil", "PyJWT", "aiortc",
                      "cryptography", "beach-rescue")},
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        **code_revision(),
    }
