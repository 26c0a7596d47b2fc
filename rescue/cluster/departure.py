"""Is this worker's drain a node stop or a reload? The answer decides whether the node
leaves the cluster (registry ``draining``, ``/readyz`` 503 for ``drain_notice_s``).

The supervisor sends the same ``Drain`` for both. In a reload it sends it only once
every worker of the new generation is ready, so those workers are alive, titled
``beach-rescue worker <slot> gen <n+1>``, as siblings of the draining worker; in a node
stop there is no later generation. The draining worker therefore looks at its
supervisor's other children. If they cannot be read, the drain counts as a stop: the
node then shows not-ready for a moment it did not need to, which sheds load but breaks
nothing, while the opposite mistake would leave peers reconnecting into a node that no
longer accepts.
"""

from __future__ import annotations

import os
import re

import psutil

WORKER_TITLE = "beach-rescue worker {slot} gen {generation}"
_TITLE = re.compile(r"beach-rescue worker (\d+) gen (\d+)")


def worker_title(slot: int, generation: int) -> str:
    """The process title of the worker of ``slot`` in ``generation``."""
    return WORKER_TITLE.format(slot=slot, generation=generation)


def title_generation(title: str) -> int | None:
    """The generation in a worker's process title, or None for any other title."""
    match = _TITLE.fullmatch(title.strip())
    return int(match[2]) if match else None


def newer_generation_running(generation: int, parent_pid: int | None = None) -> bool:
    """True if the supervisor (``parent_pid``, default this process's parent) has a
    worker of a generation later than ``generation``, i.e. this drain is a reload."""
    try:
        children = psutil.Process(os.getppid() if parent_pid is None else parent_pid
                                  ).children()
    except psutil.Error:
        return False
    me = os.getpid()
    for child in children:
        if child.pid == me:
            continue
        try:
            title = " ".join(part for part in child.cmdline() if part)
        except psutil.Error:
            continue
        found = title_generation(title)
        if found is not None and found > generation:
            return True
    return False
