"""The prometheus-client multiprocess directory, prepared before the client is imported.

prometheus-client chooses between in-process and memory-mapped values when it is first
imported, from ``PROMETHEUS_MULTIPROC_DIR``; so this module must not import it, and
:func:`prepare_multiprocess_dir` must run before anything imports :mod:`rescue.metrics`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class DirectoryBusy(Exception):
    """Another running relay already uses this metrics directory."""


def claim_multiprocess_dir(path: Path) -> int:
    """Lock ``path``'s sibling ``<path>.lock`` for this process's life; return the lock's fd.

    Two relays sharing a metrics directory would wipe and overwrite each other's files, so
    the second is refused: raises :class:`DirectoryBusy` naming the holder's pid. The lock is
    released when the process and the workers it forks have all exited.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryBusy(
            f"another beach-rescue relay (pid {holder}) uses the metrics directory {path}; "
            "give each relay its own --state-dir (or --metrics-dir)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create (or empty) ``path`` and export it for this process and its children."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prepare_multiprocess_dir must run before prometheus_client "
                           "is imported")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
