"""Tests for rescue.multiproc: the metrics directory's lock (prepare is exercised by every
relay the integration tests start)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rescue.multiproc import DirectoryBusy, claim_multiprocess_dir


def test_the_first_claim_locks_and_records_the_pid(tmp_path: Path) -> None:
    fd = claim_multiprocess_dir(tmp_path / "state" / "metrics")
    try:
        lock = tmp_path / "state" / "metrics.lock"
        assert lock.read_text().strip() == str(os.getpid())
        assert oct(lock.stat().st_mode & 0o777) == oct(0o600)
    finally:
        os.close(fd)


def test_a_second_claim_is_refused_naming_the_holder(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    fd = claim_multiprocess_dir(metrics)
    try:
        # flock conflicts between open file descriptions, in one process too
        with pytest.raises(DirectoryBusy, match=f"pid {os.getpid()}") as refused:
            claim_multiprocess_dir(metrics)
        assert str(metrics) in str(refused.value)
        assert "--state-dir" in str(refused.value)
    finally:
        os.close(fd)


def test_the_lock_is_free_again_once_its_holder_closes_it(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    os.close(claim_multiprocess_dir(metrics))
    fd = claim_multiprocess_dir(metrics)  # would raise DirectoryBusy if still held
    os.close(fd)


def test_different_directories_do_not_conflict(tmp_path: Path) -> None:
    first = claim_multiprocess_dir(tmp_path / "a" / "metrics")
    second = claim_multiprocess_dir(tmp_path / "b" / "metrics")
    os.close(first)
    os.close(second)
    assert first != second
