"""The load profiles of load/shapes.py as pure schedules, driven by a fake clock.

Locust itself is never imported here (it would monkey-patch the test process with gevent):
the profiles are plain objects, and load/locustfile.py only adapts them to LoadTestShape.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load import shapes
from load.shapes import (
    ActiveStream,
    IdleHold,
    MixedDay,
    RampToCapacity,
    ReconnectStorm,
    SettingsError,
    Step,
    Traffic,
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ticks(profile: shapes.Profile, clock: FakeClock, step_s: float = 0.5,
          limit_s: float = 100_000) -> list[tuple[float, Step]]:
    """Tick ``profile`` every ``step_s`` of fake time until it ends; return (t, step) pairs."""
    start = clock.now
    out = []
    while (step := profile.tick()) is not None:
        out.append((clock.now - start, step))
        clock.advance(step_s)
        assert clock.now - start < limit_s, "the profile never ended"
    return out


def test_idle_hold_holds_its_sessions_for_ramp_plus_hold_then_stops() -> None:
    clock = FakeClock()
    profile = IdleHold({"BEACH_LOAD_IDLE_SESSIONS": "30", "BEACH_LOAD_IDLE_SPAWN_RATE": "7",
                        "BEACH_LOAD_IDLE_HOLD_S": "10"}, clock=clock)
    seen = ticks(profile, clock)
    assert {step for _, step in seen} == {Step(30, 7.0, Traffic.IDLE)}
    assert seen[-1][0] == pytest.approx(14.5)  # ceil(30 / 7) = 5 s of ramp + 10 s of hold
    assert profile.duration_s == 15


def test_active_stream_uses_the_streaming_traffic() -> None:
    clock = FakeClock()
    profile = ActiveStream({"BEACH_LOAD_STREAM_SESSIONS": "4",
                            "BEACH_LOAD_STREAM_SPAWN_RATE": "4",
                            "BEACH_LOAD_STREAM_HOLD_S": "3"}, clock=clock)
    assert profile.tick() == Step(4, 4.0, Traffic.STREAM)
    clock.advance(3.99)
    assert profile.tick() is not None
    clock.advance(0.01)
    assert profile.tick() is None


def test_defaults_are_small_and_every_profile_ends() -> None:
    for name, cls in shapes.PROFILES.items():
        clock = FakeClock()
        profile = shapes.build_profile(name, {}, clock=clock)
        assert isinstance(profile, cls)
        assert profile.peak_sessions() <= 500
        assert 0 < profile.duration_s <= 3600
        clock.advance(profile.duration_s)
        assert profile.tick() is None, name


def test_ramp_adds_one_step_per_interval_and_ends_at_the_maximum() -> None:
    clock = FakeClock()
    profile = RampToCapacity({"BEACH_LOAD_RAMP_START_SESSIONS": "10",
                              "BEACH_LOAD_RAMP_STEP_SESSIONS": "25",
                              "BEACH_LOAD_RAMP_STEP_S": "5",
                              "BEACH_LOAD_RAMP_MAX_SESSIONS": "70"}, clock=clock)
    seen = ticks(profile, clock, step_s=1.0)
    users = [step.users for _, step in seen]
    # 10, 35, 60, then the last step is cut to the maximum: 70; five ticks per step.
    assert users == [10] * 5 + [35] * 5 + [60] * 5 + [70] * 5
    assert {step.traffic for _, step in seen} == {Traffic.STREAM}
    assert profile.duration_s == 20


def test_ramp_can_hold_idle_sessions() -> None:
    profile = RampToCapacity({"BEACH_LOAD_RAMP_ACTIVE": "0"}, clock=FakeClock())
    step = profile.tick()
    assert step is not None and step.traffic is Traffic.IDLE


def test_reconnect_storms_are_counted_at_their_times() -> None:
    clock = FakeClock()
    profile = ReconnectStorm({"BEACH_LOAD_STORM_SESSIONS": "20",
                              "BEACH_LOAD_STORM_SPAWN_RATE": "10",
                              "BEACH_LOAD_STORM_SETTLE_S": "3",
                              "BEACH_LOAD_STORM_COUNT": "2",
                              "BEACH_LOAD_STORM_EVERY_S": "4"}, clock=clock)
    # Ramp 2 s + settle 3 s: storm 1 at 5 s, storm 2 at 9 s, the end at 13 s.
    storms = {t: step.storms for t, step in ticks(profile, clock, step_s=1.0)}
    assert storms == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1, 8: 1,
                      9: 2, 10: 2, 11: 2, 12: 2}


def test_mixed_day_follows_trough_peak_trough() -> None:
    clock = FakeClock()
    profile = MixedDay({"BEACH_LOAD_DAY_S": "100", "BEACH_LOAD_DAY_PEAK_SESSIONS": "50",
                        "BEACH_LOAD_DAY_TROUGH_SESSIONS": "10"}, clock=clock)
    seen = dict(ticks(profile, clock, step_s=1.0))
    assert seen[0].users == 10
    assert seen[50].users == 50
    assert seen[25].users == seen[75].users == 30
    assert all(10 <= s.users <= 50 and s.traffic is Traffic.MIXED for s in seen.values())
    assert max(seen) == 99
    # Locust must keep up with the steepest part of the curve (40 * pi / 100 per second).
    assert seen[0].spawn_rate >= 40 * math.pi / 100


def test_the_time_limit_cuts_a_longer_plan() -> None:
    clock = FakeClock()
    profile = IdleHold({"BEACH_LOAD_IDLE_HOLD_S": "86400", "BEACH_LOAD_TIME_LIMIT_S": "30"},
                       clock=clock)
    clock.advance(29.9)
    assert profile.tick() is not None
    clock.advance(0.1)
    assert profile.tick() is None


def test_locust_run_time_lowers_the_limit_further() -> None:
    clock = FakeClock()
    profile = MixedDay({}, clock=clock, run_time_s=5)
    assert profile.duration_s == 5
    clock.advance(5)
    assert profile.tick() is None


def test_reset_time_restarts_the_schedule() -> None:
    clock = FakeClock()
    profile = IdleHold({"BEACH_LOAD_IDLE_HOLD_S": "5"}, clock=clock)
    clock.advance(100)
    assert profile.tick() is None
    profile.reset_time()
    assert profile.tick() is not None


def test_settings_come_from_the_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEACH_LOAD_IDLE_SESSIONS", "7")
    step = IdleHold(clock=FakeClock()).tick()
    assert step is not None and step.users == 7


@pytest.mark.parametrize(("values", "message"), [
    ({"BEACH_LOAD_IDLE_SESSIONS": "0"}, "BEACH_LOAD_IDLE_SESSIONS='0' is outside 1..100000"),
    ({"BEACH_LOAD_IDLE_SESSIONS": "2.5"}, "must be an integer"),
    ({"BEACH_LOAD_IDLE_SESSIONS": "many"}, "is not a number"),
    ({"BEACH_LOAD_IDLE_HOLD_S": "nan"}, "must be a finite number"),
    ({"BEACH_LOAD_TIME_LIMIT_S": "90000"}, "BEACH_LOAD_TIME_LIMIT_S"),
    ({"BEACH_LOAD_FRAMES_PER_S": "1000"}, "BEACH_LOAD_FRAMES_PER_S"),
    ({"BEACH_LOAD_IDLE_SESSIONS": "6000"}, "over BEACH_LOAD_SESSION_LIMIT=5000"),
])
def test_bad_settings_are_refused_naming_the_variable(values: dict[str, str],
                                                      message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace(".", r"\.")):
        IdleHold(values)


def test_the_session_limit_can_be_raised_on_purpose() -> None:
    profile = IdleHold({"BEACH_LOAD_IDLE_SESSIONS": "6000",
                        "BEACH_LOAD_SESSION_LIMIT": "6000"}, clock=FakeClock())
    assert profile.peak_sessions() == 6000


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(SettingsError, match="RAMP_MAX_SESSIONS must be at least"):
        RampToCapacity({"BEACH_LOAD_RAMP_START_SESSIONS": "100",
                        "BEACH_LOAD_RAMP_MAX_SESSIONS": "50"})
    with pytest.raises(SettingsError, match="TROUGH_SESSIONS must not exceed"):
        MixedDay({"BEACH_LOAD_DAY_TROUGH_SESSIONS": "300"})
    with pytest.raises(SettingsError, match="unknown shape 'flat'"):
        shapes.build_profile("flat", {})


def test_traffic_settings_default_to_64_kib_per_second() -> None:
    traffic = shapes.traffic_settings({})
    assert traffic.frame_bytes * traffic.frames_per_s == 65536
    assert traffic.heartbeat_s == 0  # the relay's own interval
    assert traffic.active_share == pytest.approx(0.2)


def test_every_setting_has_a_unique_variable_and_option() -> None:
    params = shapes.all_params()
    assert len({p.env for p in params}) == len({p.option for p in params}) == len(params)
    for p in params:
        assert p.env.startswith("BEACH_LOAD_") and p.option.startswith("--")
        assert p.lo <= p.default <= p.hi
    options = SimpleNamespace(idle_sessions="9", stream_hold_s=None)
    values = shapes.values_from(options)
    assert values["BEACH_LOAD_IDLE_SESSIONS"] == "9"
    assert values["BEACH_LOAD_STREAM_HOLD_S"] is None
    assert values["BEACH_LOAD_DAY_S"] is None  # absent attributes read as unset


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(shapes.PROFILES)),
       sessions=st.integers(1, 300), rate=st.floats(0.1, 100),
       seconds=st.integers(1, 600), limit=st.integers(1, 3600),
       probes=st.lists(st.floats(0, 5000, allow_nan=False), min_size=1, max_size=20))
def test_any_profile_stays_within_its_bounds(*, name: str, sessions: int, rate: float,
                                             seconds: int, limit: int,
                                             probes: list[float]) -> None:
    values = {
        "BEACH_LOAD_TIME_LIMIT_S": str(limit), "BEACH_LOAD_SESSION_LIMIT": "300",
        "BEACH_LOAD_IDLE_SESSIONS": str(sessions), "BEACH_LOAD_IDLE_SPAWN_RATE": str(rate),
        "BEACH_LOAD_IDLE_HOLD_S": str(seconds),
        "BEACH_LOAD_STREAM_SESSIONS": str(sessions), "BEACH_LOAD_STREAM_HOLD_S": str(seconds),
        "BEACH_LOAD_RAMP_START_SESSIONS": "1", "BEACH_LOAD_RAMP_MAX_SESSIONS": str(sessions),
        "BEACH_LOAD_RAMP_STEP_S": str(max(5, seconds // 10)),
        "BEACH_LOAD_STORM_SESSIONS": str(sessions), "BEACH_LOAD_STORM_EVERY_S": "2",
        "BEACH_LOAD_DAY_S": str(max(60, seconds)),
        "BEACH_LOAD_DAY_PEAK_SESSIONS": str(sessions), "BEACH_LOAD_DAY_TROUGH_SESSIONS": "0",
    }
    profile = shapes.build_profile(name, values, clock=FakeClock())
    assert profile.duration_s <= limit
    for t in probes:
        step = profile.at(t)
        if t >= profile.duration_s:
            assert step is None
            continue
        assert step is not None
        assert 0 <= step.users <= profile.peak_sessions() <= sessions
        assert step.spawn_rate > 0
        assert 0 <= step.storms <= 3
