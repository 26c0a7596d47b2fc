"""Chaos and soak tests: a short version in the default suite, ``--chaos-long`` for the
long one (``pytest tests/chaos --chaos-long``, or ``pytest tests --chaos-long``).

``--chaos-seed N`` replays a chaos run's schedule; without it a fresh seed is drawn and
printed (pytest shows it with the output of a failed test). Both options are registered
in tests/conftest.py, so that they are known whichever path under tests/ is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.support.chaos_plan import ChaosShape

LONG_CHAOS_TIMEOUT_S = 900
LONG_SOAK_TIMEOUT_S = 2400


@dataclass(frozen=True, slots=True)
class ChaosMode:
    """The sizes of one mode (short or long) of the chaos and soak tests."""

    long: bool
    chaos: ChaosShape
    sdk_down_bytes: int  # per pair, host to participant
    sdk_up_bytes: int  # per pair, participant to host
    soak_s: float  # traffic time, warm-up included
    soak_warmup_s: float  # not sampled for the trends
    soak_sample_every_s: float
    soak_sessions_per_worker: int  # light sessions held at all times, per worker
    soak_session_lifetime_s: tuple[float, float]
    soak_sdk_pairs_per_worker: int  # SDK pairs streaming at all times, per worker
    soak_sdk_bytes: int  # each way, per pair


SHORT = ChaosMode(
    long=False,
    chaos=ChaosShape(duration_s=30.0, workers=2, sessions=1000, session_lifetime_s=(4.0, 8.0),
                     sdk_pairs=20, sdk_lifetime_s=(6.0, 14.0)),
    sdk_down_bytes=2 << 20, sdk_up_bytes=512 << 10,
    soak_s=32.0, soak_warmup_s=8.0, soak_sample_every_s=0.5,
    soak_sessions_per_worker=40, soak_session_lifetime_s=(1.0, 4.0),
    soak_sdk_pairs_per_worker=2, soak_sdk_bytes=512 << 10)

LONG = ChaosMode(
    long=True,
    chaos=ChaosShape(duration_s=300.0, workers=2, sessions=6000,
                     session_lifetime_s=(5.0, 30.0), sdk_pairs=100,
                     sdk_lifetime_s=(30.0, 90.0)),
    sdk_down_bytes=8 << 20, sdk_up_bytes=2 << 20,
    soak_s=1800.0, soak_warmup_s=120.0, soak_sample_every_s=10.0,
    soak_sessions_per_worker=60, soak_session_lifetime_s=(2.0, 20.0),
    soak_sdk_pairs_per_worker=2, soak_sdk_bytes=1 << 20)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: chaos and soak tests (short unless --chaos-long is given)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--chaos-long"):
        return
    for item in items:
        if item.get_closest_marker("chaos") is None:
            continue
        long_timeout = LONG_SOAK_TIMEOUT_S if "soak" in item.name else LONG_CHAOS_TIMEOUT_S
        item.add_marker(pytest.mark.timeout(long_timeout))


@pytest.fixture
def chaos_mode(request: pytest.FixtureRequest) -> ChaosMode:
    """The short mode, or the long one with ``--chaos-long``."""
    return LONG if request.config.getoption("--chaos-long") else SHORT


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    """The seed of this run's schedule (printed, so a failure can be replayed)."""
    given = request.config.getoption("--chaos-seed")
    seed = given if given is not None else int.from_bytes(os.urandom(4), "big")
    print(f"chaos seed: {seed} (replay: pytest {request.node.nodeid} --chaos-seed {seed})")
    return int(seed)
