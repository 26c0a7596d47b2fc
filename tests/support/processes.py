"""The supervisor's worker processes, read from the process tree by their titles.

Each worker titles itself ``beach-rescue worker <slot> gen <generation>``; a child still
titled ``beach-rescue supervisor`` was forked and has not titled itself yet.
"""

from __future__ import annotations

import re

import psutil

from tests.support.observe import wait_until
from tests.support.relay import RelayProcess

TITLE = re.compile(r"beach-rescue worker (\d+) gen (\d+)")
WORKERS_WAIT_S = 15.0


def worker_processes(relay: RelayProcess) -> dict[int, tuple[int, int]]:
    """Live worker children of the supervisor: ``{pid: (slot, generation)}`` from titles.

    Empty once the supervisor is gone; a child with any other title fails the test.
    """
    out: dict[int, tuple[int, int]] = {}
    try:
        children = psutil.Process(relay.proc.pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            title = " ".join(part for part in child.cmdline() if part)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if title in ("", "beach-rescue supervisor"):
            continue  # exiting (no command line any more), or forked and not yet titled
        match = TITLE.fullmatch(title)
        assert match, f"a child of the supervisor with an unexpected title: {title!r}"
        out[child.pid] = (int(match[1]), int(match[2]))
    return out


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_for_workers(relay: RelayProcess, slots: int, generation: int,
                           within_s: float = WORKERS_WAIT_S) -> dict[int, int]:
    """Wait until the supervisor has exactly one worker per slot ``0..slots-1``, all of
    ``generation`` (and no other worker); return ``{slot: pid}``."""
    seen: dict[int, tuple[int, int]] = {}

    async def ready() -> bool:
        seen.clear()
        seen.update(worker_processes(relay))
        wanted = sorted((s, generation) for s in range(slots))
        return sorted(seen.values()) == wanted

    try:
        await wait_until(ready, f"{slots} workers of generation {generation}", within_s)
    except AssertionError as e:
        raise AssertionError(f"{e}; workers now: {seen}") from None
    return {slot: pid for pid, (slot, _gen) in seen.items()}
