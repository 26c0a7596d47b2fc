"""Load profiles: how many beach-rescue sessions run at each moment of a load test.

Each profile is a pure schedule: :meth:`Profile.at` maps seconds since the start to a
:class:`Step` (sessions wanted, spawn rate, traffic kind, storms triggered so far) or ``None``
once the profile is over, and :meth:`Profile.tick` reads an injected clock, so tests drive a
profile with a fake clock. This module imports nothing from Locust (importing Locust
monkey-patches the whole process with gevent); ``load/locustfile.py`` binds the profile chosen
with ``--shape`` / ``BEACH_LOAD_SHAPE`` to Locust's ``LoadTestShape``.

Every number comes from a :class:`Param`: an environment variable ``BEACH_LOAD_<NAME>`` that is
also the Locust option ``--<name>``, with a default and hard bounds; a value out of bounds is
refused with :class:`SettingsError`, never clamped. Every profile stops by itself: after its
planned duration, and at the latest after ``BEACH_LOAD_TIME_LIMIT_S``.
"""

from __future__ import annotations

import enum
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

ENV_PREFIX = "BEACH_LOAD_"
Values = Mapping[str, "str | int | float | None"]
"""Raw settings keyed by environment variable name (``os.environ`` or parsed options)."""


class SettingsError(ValueError):
    """A load setting is malformed or out of its bounds; the message names the variable."""


@dataclass(frozen=True)
class Param:
    """One numeric setting: its environment variable, default, inclusive bounds and meaning."""

    env: str
    default: float
    lo: float
    hi: float
    help: str
    integer: bool = True

    @property
    def key(self) -> str:
        """The short name, e.g. ``idle_sessions`` (also the Locust option's ``dest``)."""
        return self.env.removeprefix(ENV_PREFIX).lower()

    @property
    def option(self) -> str:
        """The Locust command-line option, e.g. ``--idle-sessions``."""
        return "--" + self.key.replace("_", "-")

    def parse(self, raw: str | int | float | None) -> float:
        """Return the value of ``raw`` (``None`` or empty: the default) or raise SettingsError."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return self.default
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{self.env}={raw!r} is not a number") from None
        if not math.isfinite(value) or (self.integer and not value.is_integer()):
            kind = "an integer" if self.integer else "a finite number"
            raise SettingsError(f"{self.env}={raw!r} must be {kind}")
        if not self.lo <= value <= self.hi:
            raise SettingsError(f"{self.env}={raw!r} is outside {self.lo:g}..{self.hi:g}")
        return value


def read_params(params: tuple[Param, ...], values: Values) -> dict[str, float]:
    """Parse ``params`` from ``values`` (keyed by env name); return ``{param.key: value}``."""
    return {p.key: p.parse(values.get(p.env)) for p in params}


class Traffic(enum.StrEnum):
    """What each session does once its host and participant are in."""

    IDLE = "idle"
    """Heartbeats only."""
    STREAM = "stream"
    """The host streams data frames to the participant, which sends small input back."""
    MIXED = "mixed"
    """Sessions come and go; a share of them stream, the others idle."""


@dataclass(frozen=True)
class Step:
    """What a profile wants at one moment: sessions, spawn rate (sessions/s), traffic, storms.

    ``storms`` counts the reconnect storms that should have been triggered by now.
    """

    users: int
    spawn_rate: float
    traffic: Traffic
    storms: int = 0


COMMON_PARAMS = (
    Param("BEACH_LOAD_TIME_LIMIT_S", 3600, 1, 86400,
          "hard time limit of any profile, seconds"),
    Param("BEACH_LOAD_SESSION_LIMIT", 5000, 1, 100000,
          "refuse profiles that would run more concurrent sessions than this"),
)

TRAFFIC_PARAMS = (
    Param("BEACH_LOAD_HEARTBEAT_S", 0, 0, 600,
          "heartbeat frame interval per connection; 0: the relay's heartbeat_s", integer=False),
    Param("BEACH_LOAD_FRAME_BYTES", 4096, 8, 65535,
          "payload of each host data frame (streaming sessions)"),
    Param("BEACH_LOAD_FRAMES_PER_S", 16, 0.1, 400,
          "host data frames per second (4096 x 16 = 64 KiB/s)", integer=False),
    Param("BEACH_LOAD_INPUT_BYTES", 64, 8, 65535,
          "payload of each participant input frame (streaming sessions)"),
    Param("BEACH_LOAD_INPUTS_PER_S", 2, 0, 400,
          "participant input frames per second; 0: none", integer=False),
    Param("BEACH_LOAD_DAY_ACTIVE_PERCENT", 20, 0, 100,
          "mixed_day: percentage of sessions that stream; the others idle", integer=False),
    Param("BEACH_LOAD_DAY_SESSION_MEAN_S", 120, 1, 86400,
          "mixed_day: mean session lifetime (exponential), seconds", integer=False),
    Param("BEACH_LOAD_DAY_GAP_MEAN_S", 5, 0, 3600,
          "mixed_day: mean pause before a slot starts its next session, seconds",
          integer=False),
)


@dataclass(frozen=True)
class TrafficSettings:
    """What each session sends; read by the users (on every Locust worker)."""

    heartbeat_s: float
    frame_bytes: int
    frames_per_s: float
    input_bytes: int
    inputs_per_s: float
    active_share: float
    session_mean_s: float
    gap_mean_s: float


def traffic_settings(values: Values) -> TrafficSettings:
    """Parse :data:`TRAFFIC_PARAMS` from ``values``; raises :class:`SettingsError`."""
    p = read_params(TRAFFIC_PARAMS, values)
    return TrafficSettings(
        heartbeat_s=p["heartbeat_s"], frame_bytes=int(p["frame_bytes"]),
        frames_per_s=p["frames_per_s"], input_bytes=int(p["input_bytes"]),
        inputs_per_s=p["inputs_per_s"], active_share=p["day_active_percent"] / 100,
        session_mean_s=p["day_session_mean_s"], gap_mean_s=p["day_gap_mean_s"])


class Profile(ABC):
    """A schedule of concurrent sessions, bounded in count and in time.

    ``values`` are the raw settings (default: ``os.environ``); ``clock`` returns seconds
    (default ``time.monotonic``); ``run_time_s`` (Locust's ``--run-time``) lowers the time
    limit further. Raises :class:`SettingsError` for a setting out of bounds or a peak above
    ``BEACH_LOAD_SESSION_LIMIT``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]

    def __init__(self, values: Values | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 run_time_s: float | None = None) -> None:
        values = os.environ if values is None else values
        common = read_params(COMMON_PARAMS, values)
        self.p = read_params(self.params, values)
        self.traffic_settings = traffic_settings(values)
        problem = self._inconsistency()
        if problem is not None:
            raise SettingsError(problem)
        peak = self.peak_sessions()
        if peak > common["session_limit"]:
            raise SettingsError(
                f"{self.name} would run {peak} concurrent sessions, over "
                f"BEACH_LOAD_SESSION_LIMIT={common['session_limit']:g}; raise it on purpose")
        limit = common["time_limit_s"]
        self.time_limit_s = limit if run_time_s is None else min(limit, run_time_s)
        self._clock = clock
        self._start = clock()

    def _inconsistency(self) -> str | None:
        """What is wrong with settings that are each in bounds but do not fit together."""
        return None

    @property
    def duration_s(self) -> float:
        """Seconds until the profile ends: its plan, cut at the time limit."""
        return min(self.planned_s(), self.time_limit_s)

    def at(self, t: float) -> Step | None:
        """The step ``t`` seconds after the start, or ``None`` when the profile is over."""
        if t >= self.duration_s:
            return None
        return self._step(max(t, 0.0))

    def tick(self) -> Step | None:
        """The step now, by the injected clock (the ``LoadTestShape.tick`` of this profile)."""
        return self.at(self._clock() - self._start)

    def reset_time(self) -> None:
        """Make now the profile's start."""
        self._start = self._clock()

    @abstractmethod
    def planned_s(self) -> float:
        """Seconds the profile runs when the time limit does not cut it."""

    @abstractmethod
    def peak_sessions(self) -> int:
        """The largest number of concurrent sessions the profile asks for."""

    @abstractmethod
    def _step(self, t: float) -> Step:
        """The step at ``t`` (0 <= t < duration)."""


def _ramp_s(sessions: float, rate: float) -> float:
    """Seconds Locust needs to start ``sessions`` users at ``rate`` per second."""
    return math.ceil(sessions / rate)


class IdleHold(Profile):
    """Open sessions at a steady rate, hold them with heartbeats only, then stop."""

    name = "idle_hold"
    summary = "N idle sessions (heartbeats only) held for a while: memory and CPU per connection"
    params = (
        Param("BEACH_LOAD_IDLE_SESSIONS", 100, 1, 100000, "idle_hold: sessions to hold"),
        Param("BEACH_LOAD_IDLE_SPAWN_RATE", 50, 0.1, 5000,
              "idle_hold: sessions started per second", integer=False),
        Param("BEACH_LOAD_IDLE_HOLD_S", 60, 1, 86400,
              "idle_hold: seconds to hold once all are started", integer=False),
    )

    def planned_s(self) -> float:
        """Ramp plus hold."""
        return _ramp_s(self.p["idle_sessions"], self.p["idle_spawn_rate"]) + self.p["idle_hold_s"]

    def peak_sessions(self) -> int:
        """All the sessions, held together."""
        return int(self.p["idle_sessions"])

    def _step(self, t: float) -> Step:
        return Step(int(self.p["idle_sessions"]), self.p["idle_spawn_rate"], Traffic.IDLE)


class ActiveStream(Profile):
    """Open sessions that each stream (64 KiB/s by default) and hold them."""

    name = "active_stream"
    summary = "N streaming sessions (64 KiB/s each by default) held: CPU per relayed message"
    params = (
        Param("BEACH_LOAD_STREAM_SESSIONS", 50, 1, 100000, "active_stream: sessions"),
        Param("BEACH_LOAD_STREAM_SPAWN_RATE", 25, 0.1, 5000,
              "active_stream: sessions started per second", integer=False),
        Param("BEACH_LOAD_STREAM_HOLD_S", 60, 1, 86400,
              "active_stream: seconds to hold once all are started", integer=False),
    )

    def planned_s(self) -> float:
        """Ramp plus hold."""
        return (_ramp_s(self.p["stream_sessions"], self.p["stream_spawn_rate"])
                + self.p["stream_hold_s"])

    def peak_sessions(self) -> int:
        """All the sessions, held together."""
        return int(self.p["stream_sessions"])

    def _step(self, t: float) -> Step:
        return Step(int(self.p["stream_sessions"]), self.p["stream_spawn_rate"], Traffic.STREAM)


class RampToCapacity(Profile):
    """Add sessions in steps of fixed length up to a maximum, so each step can be read apart."""

    name = "ramp_to_capacity"
    summary = "sessions added step by step: where latency and failures start to grow"
    params = (
        Param("BEACH_LOAD_RAMP_START_SESSIONS", 50, 1, 100000,
              "ramp_to_capacity: sessions in the first step"),
        Param("BEACH_LOAD_RAMP_STEP_SESSIONS", 50, 1, 100000,
              "ramp_to_capacity: sessions added per step"),
        Param("BEACH_LOAD_RAMP_STEP_S", 30, 5, 3600,
              "ramp_to_capacity: seconds per step", integer=False),
        Param("BEACH_LOAD_RAMP_MAX_SESSIONS", 500, 1, 100000,
              "ramp_to_capacity: sessions in the last step"),
        Param("BEACH_LOAD_RAMP_SPAWN_RATE", 50, 0.1, 5000,
              "ramp_to_capacity: sessions started per second within a step", integer=False),
        Param("BEACH_LOAD_RAMP_ACTIVE", 1, 0, 1,
              "ramp_to_capacity: 1 streaming sessions, 0 idle sessions"),
    )

    def _inconsistency(self) -> str | None:
        if self.p["ramp_max_sessions"] < self.p["ramp_start_sessions"]:
            return "BEACH_LOAD_RAMP_MAX_SESSIONS must be at least BEACH_LOAD_RAMP_START_SESSIONS"
        return None

    def steps(self) -> int:
        """Number of steps: the start, then one per increment, the last one at the maximum."""
        span = self.p["ramp_max_sessions"] - self.p["ramp_start_sessions"]
        return 1 + math.ceil(span / self.p["ramp_step_sessions"])

    def planned_s(self) -> float:
        """One step length per step."""
        return self.steps() * self.p["ramp_step_s"]

    def peak_sessions(self) -> int:
        """The last step's sessions."""
        return int(self.p["ramp_max_sessions"])

    def _step(self, t: float) -> Step:
        k = min(int(t // self.p["ramp_step_s"]), self.steps() - 1)
        users = min(self.p["ramp_start_sessions"] + k * self.p["ramp_step_sessions"],
                    self.p["ramp_max_sessions"])
        traffic = Traffic.STREAM if self.p["ramp_active"] else Traffic.IDLE
        return Step(int(users), self.p["ramp_spawn_rate"], traffic)


class ReconnectStorm(Profile):
    """Hold idle sessions and make all of them drop and reconnect at once, several times."""

    name = "reconnect_storm"
    summary = "every session drops and reconnects at once, repeatedly: reconnect latency"
    params = (
        Param("BEACH_LOAD_STORM_SESSIONS", 200, 1, 100000, "reconnect_storm: sessions"),
        Param("BEACH_LOAD_STORM_SPAWN_RATE", 100, 0.1, 5000,
              "reconnect_storm: sessions started per second", integer=False),
        Param("BEACH_LOAD_STORM_SETTLE_S", 10, 0, 3600,
              "reconnect_storm: seconds between the end of the ramp and the first storm",
              integer=False),
        Param("BEACH_LOAD_STORM_COUNT", 3, 1, 100, "reconnect_storm: storms"),
        Param("BEACH_LOAD_STORM_EVERY_S", 20, 2, 3600,
              "reconnect_storm: seconds between storms (and after the last)", integer=False),
        Param("BEACH_LOAD_STORM_SPREAD_MS", 1000, 0, 60000,
              "reconnect_storm: each peer reconnects after a random delay up to this"),
    )

    def first_storm_s(self) -> float:
        """When the first storm is triggered, seconds after the start."""
        return (_ramp_s(self.p["storm_sessions"], self.p["storm_spawn_rate"])
                + self.p["storm_settle_s"])

    def planned_s(self) -> float:
        """Ramp, settle, then one interval per storm."""
        return self.first_storm_s() + self.p["storm_count"] * self.p["storm_every_s"]

    def peak_sessions(self) -> int:
        """All the sessions, held together."""
        return int(self.p["storm_sessions"])

    def _step(self, t: float) -> Step:
        since = t - self.first_storm_s()
        storms = 0 if since < 0 else min(int(since // self.p["storm_every_s"]) + 1,
                                         int(self.p["storm_count"]))
        return Step(int(self.p["storm_sessions"]), self.p["storm_spawn_rate"], Traffic.IDLE,
                    storms)


class MixedDay(Profile):
    """A day compressed into ``BEACH_LOAD_DAY_S``: concurrency follows a cosine from the
    trough to the peak and back, and every session has a random lifetime, so sessions keep
    arriving and leaving all day (arrivals ~ concurrent sessions / mean lifetime)."""

    name = "mixed_day"
    summary = "a compressed day: sessions arrive and leave, some stream, some idle"
    params = (
        Param("BEACH_LOAD_DAY_S", 600, 60, 86400, "mixed_day: length of the day, seconds",
              integer=False),
        Param("BEACH_LOAD_DAY_PEAK_SESSIONS", 200, 1, 100000,
              "mixed_day: concurrent session slots at midday"),
        Param("BEACH_LOAD_DAY_TROUGH_SESSIONS", 20, 0, 100000,
              "mixed_day: concurrent session slots at the start and end of the day"),
    )

    def _inconsistency(self) -> str | None:
        if self.p["day_trough_sessions"] > self.p["day_peak_sessions"]:
            return "BEACH_LOAD_DAY_TROUGH_SESSIONS must not exceed BEACH_LOAD_DAY_PEAK_SESSIONS"
        return None

    def planned_s(self) -> float:
        """One day."""
        return self.p["day_s"]

    def peak_sessions(self) -> int:
        """The midday peak."""
        return int(self.p["day_peak_sessions"])

    def spawn_rate(self) -> float:
        """Twice the curve's steepest slope (at least 1/s), so Locust keeps up with it."""
        swing = self.p["day_peak_sessions"] - self.p["day_trough_sessions"]
        return max(1.0, 2 * swing * math.pi / self.p["day_s"])

    def _step(self, t: float) -> Step:
        trough, peak = self.p["day_trough_sessions"], self.p["day_peak_sessions"]
        phase = (1 - math.cos(2 * math.pi * t / self.p["day_s"])) / 2
        return Step(round(trough + (peak - trough) * phase), self.spawn_rate(), Traffic.MIXED)


PROFILES: dict[str, type[Profile]] = {
    cls.name: cls for cls in (IdleHold, ActiveStream, RampToCapacity, ReconnectStorm, MixedDay)}
"""Every profile by its ``--shape`` name."""

DEFAULT_PROFILE = IdleHold.name


def all_params() -> tuple[Param, ...]:
    """Every setting of every profile, the common ones and the traffic ones, without repeats."""
    seen: dict[str, Param] = {}
    for group in (COMMON_PARAMS, TRAFFIC_PARAMS, *(cls.params for cls in PROFILES.values())):
        for param in group:
            seen.setdefault(param.env, param)
    return tuple(seen.values())


def values_from(options: object) -> dict[str, str | int | float | None]:
    """Raw settings from parsed Locust options (attribute ``param.key`` of each param),
    keyed by environment variable name, for :func:`build_profile` and the users."""
    return {p.env: getattr(options, p.key, None) for p in all_params()}


def build_profile(name: str, values: Values | None = None, *,
                  clock: Callable[[], float] = time.monotonic,
                  run_time_s: float | None = None) -> Profile:
    """Return the profile called ``name``; raises :class:`SettingsError` for an unknown name."""
    cls = PROFILES.get(name)
    if cls is None:
        raise SettingsError(f"unknown shape {name!r}; choose one of {', '.join(PROFILES)}")
    return cls(values, clock=clock, run_time_s=run_time_s)
