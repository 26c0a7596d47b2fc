"""Process titles of relay workers: ``beach-rescue worker <slot> gen <generation>``.

Operators see them in ``ps``; tests and tools read a worker's slot and generation back
from them.
"""

from __future__ import annotations

import re

WORKER_TITLE = "beach-rescue worker {slot} gen {generation}"
_TITLE = re.compile(r"beach-rescue worker (\d+) gen (\d+)")


def worker_title(slot: int, generation: int) -> str:
    """The process title of the worker of ``slot`` in ``generation``."""
    return WORKER_TITLE.format(slot=slot, generation=generation)


def title_generation(title: str) -> int | None:
    """The generation in a worker's process title, or None for any other title."""
    match = _TITLE.fullmatch(title.strip())
    return int(match[2]) if match else None
