"""Generator child processes driven over JSON lines on stdin/stdout: both ends of the pipe.

Every multi-process bench (:mod:`loadgen`, :mod:`accept_load`, :mod:`storm_bench`,
:mod:`webrtc_bench`) starts its generators the same way: a child script pinned to the
generator CPUs, a configuration as the first line on its stdin, then commands down and events
(``{"event": ...}``) up, one JSON object per line. The parent side is :func:`spawn`,
:func:`send`, :func:`read_event`, :func:`reap` and :func:`kill_all`; the child side is
:func:`open_stdin`, :func:`emit` and :func:`raise_nofile_limit`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench_host import pin

Child = asyncio.subprocess.Process


async def spawn(script: Path | str, cpus: list[int] | None, *, limit: int = 2**24) -> Child:
    """Start ``python script`` with pipes on stdin and stdout, pinned to ``cpus``.

    ``limit`` bounds one line the parent can read (result events carry histograms).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, limit=limit)
    pin(proc.pid, cpus)
    return proc


async def send(proc: Child, message: dict[str, Any]) -> None:
    """Write ``message`` as one JSON line to the child's stdin."""
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(message) + "\n").encode())
    await proc.stdin.drain()


class ChildError(RuntimeError):
    """A child process exited, answered something unexpected or nothing in time."""


async def read_event(proc: Child, expected: str, limit_s: float) -> dict[str, Any]:
    """Return the child's next event, which must be ``{"event": expected, ...}``.

    Raises :class:`ChildError` when the child says something else, exits, or is silent for
    ``limit_s`` seconds.
    """
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), limit_s)
    except TimeoutError:
        raise ChildError(f"child pid {proc.pid}: no {expected!r} within {limit_s:.0f}s") \
            from None
    if not line:
        raise ChildError(f"child pid {proc.pid} exited (code {proc.returncode}) "
                         f"before {expected!r}")
    event: dict[str, Any] = json.loads(line)
    if event.get("event") != expected:
        raise ChildError(f"child pid {proc.pid}: expected {expected!r}, got {event!r}"[:500])
    return event


async def reap(procs: Iterable[Child], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for each child to exit by itself; kill the ones that do not."""
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def kill_all(procs: Iterable[Child]) -> None:
    """Kill and reap every child still running (for ``finally`` blocks)."""
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the child's side ------------------------------------------------------------------------

async def open_stdin() -> asyncio.StreamReader:
    """Return a stream reader over this process's stdin (the parent's commands)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def emit(event: dict[str, Any]) -> None:
    """Write ``event`` as one compact JSON line to stdout (to the parent) and flush."""
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_nofile_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (20,000 on these machines)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
