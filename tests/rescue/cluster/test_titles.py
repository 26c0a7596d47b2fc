"""Worker process titles: written by the worker, read back by tools and tests."""

from __future__ import annotations

from rescue.cluster.titles import title_generation, worker_title


def test_titles_round_trip() -> None:
    assert worker_title(3, 7) == "beach-rescue worker 3 gen 7"
    assert title_generation(worker_title(3, 7)) == 7
    assert title_generation(" beach-rescue worker 0 gen 12 ") == 12


def test_other_titles_have_no_generation() -> None:
    assert title_generation("beach-rescue supervisor") is None
    assert title_generation("beach-rescue worker x gen 1") is None
    assert title_generation("beach-rescue worker 1 gen") is None
