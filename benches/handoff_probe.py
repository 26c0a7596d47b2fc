"""Connections one at a time, each known to be served locally or handed off.

From the client side nobody can tell which ``SO_REUSEPORT`` listener the kernel put a
connection on (the hash has a per-boot secret). But the server side is visible on the same
machine: right after its TCP connect, the probe looks the connection up in ``/proc/net/tcp``
(the relay's end: local port = relay port, remote port = our port; its inode is set once a
worker has accepted it) and finds the worker process holding that inode in ``/proc/<pid>/fd``.
Then it knows the accepting slot *before* it sends a byte, and picks the session accordingly
from pools computed with the relay's own ring (:class:`rescue.ring.Ring`): a session the
accepting slot owns (served locally) or one another slot owns (handed off), at random, half
and half. Only then does it send the upgrade and the hello and time them.

What is timed for each connection: TCP connect (``connect()`` returning) plus request sent ->
``server_hello`` received. The lookup pause in between is left out; the worker accepted the
connection during it in both classes alike, so the difference between the classes is the
hand-off (peek, ``send_fds``, the owner waking up and adopting) and nothing else.
"""

from __future__ import annotations

import math
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench_tokens import TokenMinter
from ws_client import HandshakeError, client_hello, hello_blocking, upgrade_request

from rescue.ring import Ring

LOOKUP_TIMEOUT_S = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class ProbeResult:
    """Per-class samples (µs) of one probe run, and what could not be classified."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {"local": [],
                                                                      "handed_off": []})
    request_only: dict[str, list[float]] = field(default_factory=lambda: {"local": [],
                                                                           "handed_off": []})
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {"local": [],
                                                                     "handed_off": []})
    accept_slots: dict[int, int] = field(default_factory=dict)
    unclassified: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    lookup_ms_max: float = 0.0


def session_pools(prefix: str, slots: int, per_slot: int) -> dict[int, list[str]]:
    """Return ``per_slot`` session ids owned by each slot of a ``slots``-worker relay."""
    ring = Ring(range(slots))
    pools: dict[int, list[str]] = {s: [] for s in range(slots)}
    i = 0
    while any(len(pool) < per_slot for pool in pools.values()):
        sid = f"{prefix}-{i}"
        owner = ring.owner(sid)
        if len(pools[owner]) < per_slot:
            pools[owner].append(sid)
        i += 1
    return pools


def _server_inode(relay_port: int, client_port: int) -> int:
    """Return the inode of the relay's end of our connection (0: not accepted yet)."""
    needle = f":{relay_port:04X} 0100007F:{client_port:04X} "
    with open("/proc/net/tcp") as f:
        table = f.read()
    at = table.find(needle)
    if at < 0:
        return 0
    line_end = table.find("\n", at)
    fields = table[at:line_end].split()
    # fields: local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    return int(fields[8]) if len(fields) > 8 else 0


def _holder(inode: int, workers: dict[int, int]) -> int | None:
    """Return the slot of the worker (``pid -> slot``) whose descriptors include ``inode``."""
    target = f"socket:[{inode}]"
    for pid, slot in workers.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}") == target:
                    return slot
            except OSError:
                continue
    return None


def accepting_slot(relay_port: int, client_port: int, workers: dict[int, int],
                   timeout_s: float = LOOKUP_TIMEOUT_S) -> int | None:
    """Wait (bounded) until a worker has accepted our connection; return its slot."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inode = _server_inode(relay_port, client_port)
        if inode:
            slot = _holder(inode, workers)
            if slot is not None:
                return slot
        time.sleep(0.0002)
    return None


def probe(port: int, workers: dict[int, int], connections: int, minter: TokenMinter,
          prefix: str, *, gap_s: float = 0.001, seed: int = 1,
          cpu_reader: Callable[[], float] | None = None,
          progress: Callable[[int], None] | None = None) -> ProbeResult:
    """Open ``connections`` connections one at a time; time and classify each (see module doc).

    ``workers`` maps worker pid to slot. With one worker every connection is local. With
    ``cpu_reader`` (the relay's CPU seconds so far), the relay CPU from one connection's
    request to the next one's is charged to the first: its upgrade, hello and close, and the
    accept of the next connection, which costs the same in both classes.
    """
    slots = len(set(workers.values()))
    rng = random.Random(seed)
    pools = session_pools(prefix, slots, connections)
    result = ProbeResult()
    last: tuple[str, float] | None = None  # (class, relay CPU at its request)
    for n in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            t0 = time.perf_counter_ns()
            sock.connect(("127.0.0.1", port))
            t1 = time.perf_counter_ns()
            lookup_start = time.monotonic()
            slot = accepting_slot(port, sock.getsockname()[1], workers)
            result.lookup_ms_max = max(result.lookup_ms_max,
                                       (time.monotonic() - lookup_start) * 1000)
            if slot is None:
                result.unclassified += 1
                continue
            result.accept_slots[slot] = result.accept_slots.get(slot, 0) + 1
            handed_off = slots > 1 and rng.random() < 0.5
            owner = rng.choice([s for s in range(slots) if s != slot]) if handed_off else slot
            session_id = pools[owner].pop()
            request = upgrade_request("127.0.0.1", port, session_id, minter.mint(session_id))
            hello = client_hello(session_id, "host", os.urandom(8).hex())
            kind = "handed_off" if handed_off else "local"
            if cpu_reader is not None:
                cpu = cpu_reader()
                if last is not None:
                    result.cpu_us[last[0]].append((cpu - last[1]) * 1e6)
                last = (kind, cpu)
            t2 = time.perf_counter_ns()
            hello_blocking(sock, request, hello)
            t3 = time.perf_counter_ns()
        except (HandshakeError, OSError) as e:
            reason = e.reason if isinstance(e, HandshakeError) else type(e).__name__
            result.failures[reason] = result.failures.get(reason, 0) + 1
            continue
        finally:
            # A reset leaves no TIME_WAIT entry behind, so /proc/net/tcp stays short.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        result.samples[kind].append((t1 - t0 + t3 - t2) / 1000)
        result.request_only[kind].append((t3 - t2) / 1000)
        if progress is not None and (n + 1) % 500 == 0:
            progress(n + 1)
        if gap_s:
            time.sleep(gap_s)
    return result


def percentile(values: list[float], p: float) -> float | None:
    """Return the ``p``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, Any]:
    """Return count, p50, p95, p99, mean and max of microsecond samples, in ms."""
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None,
                "max_ms": None}

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v / 1000, 4)

    return {"n": len(values), "p50_ms": ms(percentile(values, 50)),
            "p95_ms": ms(percentile(values, 95)), "p99_ms": ms(percentile(values, 99)),
            "mean_ms": ms(sum(values) / len(values)), "max_ms": ms(max(values))}
