"""The chaos plan of tests/support/chaos_plan.py: one seed, one plan, faults where promised."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.chaos_plan import ChaosShape, DisconnectPicker, make_plan

SHORT = ChaosShape(duration_s=30.0, workers=2, sessions=1000, session_lifetime_s=(4.0, 8.0),
                   sdk_pairs=20, sdk_lifetime_s=(6.0, 14.0))
LONG = ChaosShape(duration_s=300.0, workers=2, sessions=6000, session_lifetime_s=(5.0, 30.0),
                  sdk_pairs=100, sdk_lifetime_s=(30.0, 90.0))


def test_the_same_seed_gives_the_same_plan() -> None:
    assert make_plan(42, SHORT) == make_plan(42, SHORT)
    assert make_plan(42, SHORT).describe().startswith("seed=42 ")
    assert make_plan(42, SHORT) != make_plan(43, SHORT)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), shape=st.sampled_from([SHORT, LONG]))
def test_every_plan_keeps_its_promises(seed: int, shape: ChaosShape) -> None:
    plan = make_plan(seed, shape)
    window = shape.duration_s
    assert len(plan.sessions) == shape.sessions and len(plan.sdk_pairs) == shape.sdk_pairs
    for arrival, bounds in ([(a, shape.session_lifetime_s) for a in plan.sessions]
                            + [(a, shape.sdk_lifetime_s) for a in plan.sdk_pairs]):
        assert bounds[0] <= arrival.lifetime_s <= bounds[1]
        assert arrival.at_s >= 0 and arrival.at_s + arrival.lifetime_s <= window + 0.01
    assert plan.ends_at_s <= window + 0.01
    # A kill per period (at least one), a period apart give or take the jitter (±1 s).
    assert len(plan.kills) == max(1, int((window - 2.0) // shape.kill_every_s))
    times = [k.at_s for k in plan.kills]
    assert times == sorted(times) and all(0 < t < window for t in times)
    assert all(b - a >= shape.kill_every_s - 2.0 for a, b in itertools.pairwise(times))
    assert times[-1] <= window - 1.0
    assert all(k.slot in range(shape.workers) for k in plan.kills)
    # Stalls stay clear of the kills and end inside the window.
    assert plan.stalls
    for stall in plan.stalls:
        assert stall.for_s == shape.stall_s and stall.slot in range(shape.workers)
        assert stall.at_s > 0 and stall.at_s + stall.for_s < window
        for kill in plan.kills:
            assert kill.at_s <= stall.at_s - shape.fault_gap_s + 1e-9 or \
                kill.at_s >= stall.at_s + stall.for_s + shape.fault_gap_s - 1e-9
    # Redis comes back inside the window after every outage, which starts while SDK pairs
    # still arrive.
    assert plan.outages
    for outage in plan.outages:
        assert outage.at_s <= window - shape.sdk_lifetime_s[1]
        assert shape.outage_s[0] <= outage.for_s <= shape.outage_s[1]
        assert outage.at_s > 0 and outage.at_s + outage.for_s < window


def test_the_picker_disconnects_the_share_on_average() -> None:
    picker = DisconnectPicker(seed=1, share=0.05)
    peers = [f"peer-{i:03d}" for i in range(30)]  # 1.5 per tick
    picked = [picker.pick(peers) for _ in range(100)]
    assert sum(len(p) for p in picked) == 150
    assert all(len(set(p)) == len(p) and set(p) <= set(peers) for p in picked)
    assert {len(p) for p in picked} == {1, 2}  # the fraction carries over


def test_the_picker_replays_with_its_seed_and_copes_with_nobody() -> None:
    peers = [f"peer-{i}" for i in range(200)]
    a, b = DisconnectPicker(7, 0.05), DisconnectPicker(7, 0.05)
    assert [a.pick(peers) for _ in range(5)] == [b.pick(peers) for _ in range(5)]
    assert DisconnectPicker(7, 0.05).pick([]) == []


def test_a_window_too_crowded_for_a_stall_is_refused() -> None:
    crowded = ChaosShape(duration_s=12.0, workers=2, sessions=1, session_lifetime_s=(1, 2),
                         sdk_pairs=0, sdk_lifetime_s=(1, 2), kill_every_s=2.0)
    with pytest.raises(ValueError, match="no room for a stall"):
        make_plan(1, crowded)
