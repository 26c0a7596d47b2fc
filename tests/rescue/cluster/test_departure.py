"""Tests for rescue.cluster.departure: telling a reload from a node stop by the titles of
the supervisor's other workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rescue.cluster.departure import (
    newer_generation_running,
    title_generation,
    worker_title,
)

READY_TIMEOUT_S = 10.0
CHILD = ("import setproctitle, sys; setproctitle.setproctitle(sys.argv[1]); "
         "print('titled', flush=True); sys.stdin.read()")


@contextmanager
def titled_child(title: str) -> Iterator[int]:
    """A child of this process titled ``title`` until the block ends; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, title], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"titled\n"  # set before we look
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(READY_TIMEOUT_S)
        proc.stdout.close()  # type: ignore[union-attr]


def test_titles_round_trip() -> None:
    assert worker_title(3, 7) == "beach-rescue worker 3 gen 7"
    assert title_generation(worker_title(3, 7)) == 7
    assert title_generation("beach-rescue supervisor") is None
    assert title_generation("beach-rescue worker x gen 1") is None


def test_no_sibling_worker_means_a_stop() -> None:
    assert not newer_generation_running(1, parent_pid=os.getpid())
    with titled_child(worker_title(0, 1)):  # a sibling of the same generation
        assert not newer_generation_running(1, parent_pid=os.getpid())
    with titled_child("some other program"):
        assert not newer_generation_running(1, parent_pid=os.getpid())


def test_a_sibling_of_a_later_generation_means_a_reload() -> None:
    with titled_child(worker_title(1, 2)):
        assert newer_generation_running(1, parent_pid=os.getpid())
        assert not newer_generation_running(2, parent_pid=os.getpid())


def test_an_unreadable_parent_counts_as_a_stop() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(READY_TIMEOUT_S)
    assert not newer_generation_running(1, parent_pid=proc.pid)  # gone: no such process
