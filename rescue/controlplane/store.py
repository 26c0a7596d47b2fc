"""Where the control plane keeps its shared state: guardrail counters and the kill switch.

:class:`Store` is the interface; :class:`MemoryStore` keeps everything in this process
(a single machine without Redis, development); ``rescue.controlplane.redis_store``
keeps it in Redis for a fleet. Both count atomically and expire counters after
:data:`~rescue.controlplane.guardrail.COUNTER_TTL_S`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from rescue.controlplane.guardrail import COUNTER_TTL_S, counter_keys


class StoreUnavailable(Exception):
    """The store could not be reached (or answered nonsense) in time."""


class Pause(enum.Enum):
    """The kill switch: off, soft (no new connections) or hard (existing ones closed too)."""

    OFF = "off"
    SOFT = "soft"
    HARD = "hard"


class Store(Protocol):
    """Shared control-plane state. Every method may raise :class:`StoreUnavailable`."""

    async def count_fallback(self, cohort: str, now: float) -> tuple[int, int]:
        """Count one fallback token in the cohort-hour; return ``(fallback, total)``."""
        ...

    async def count_session(self, cohort: str, now: float) -> int:
        """Count one session created in the cohort-hour; return the new total."""
        ...

    async def pause_state(self) -> Pause:
        """The kill switch as stored."""
        ...

    async def set_pause(self, pause: Pause) -> None:
        """Set the kill switch."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """A :class:`Store` in this process's memory, with expiring counters.

    With ``pause_file`` the kill switch also lives in that file, so a reload or restart of
    a node without Redis keeps it (the counters start over: they are hourly anyway).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 pause_file: Path | None = None) -> None:
        self._clock = clock
        self._counters: dict[str, tuple[int, float]] = {}
        self._pause_file = pause_file
        self._pause = read_pause(pause_file)

    def _incr(self, key: str) -> int:
        now = self._clock()
        value, expires = self._counters.get(key, (0, 0.0))
        if expires <= now:
            value, expires = 0, now + COUNTER_TTL_S
        value += 1
        self._counters[key] = (value, expires)
        if len(self._counters) > 100_000:
            self._expire(now)
        return value

    def _get(self, key: str) -> int:
        value, expires = self._counters.get(key, (0, 0.0))
        return value if expires > self._clock() else 0

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._counters.items() if exp <= now]:
            del self._counters[key]

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it is not set (for tests and stats)."""
        value, expires = self._counters.get(key, (0, 0.0))
        remaining = expires - self._clock()
        return remaining if value and remaining > 0 else None

    async def count_fallback(self, cohort: str, now: float) -> tuple[int, int]:
        fallback_key, total_key = counter_keys(cohort, now)
        return self._incr(fallback_key), self._get(total_key)

    async def count_session(self, cohort: str, now: float) -> int:
        return self._incr(counter_keys(cohort, now)[1])

    async def pause_state(self) -> Pause:
        return self._pause

    async def set_pause(self, pause: Pause) -> None:
        self._pause = pause
        if self._pause_file is not None:
            temporary = self._pause_file.with_suffix(".tmp")
            temporary.write_text(pause.value + "\n")
            temporary.replace(self._pause_file)  # atomic: a reader sees old or new

    async def close(self) -> None:
        return None


def read_pause(path: Path | None) -> Pause:
    """The switch saved in ``path``; off when there is none (or it is unreadable)."""
    if path is None:
        return Pause.OFF
    try:
        return Pause(path.read_text().strip())
    except (OSError, ValueError):
        return Pause.OFF
