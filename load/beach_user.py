"""Locust users that run beach-rescue sessions, one at a time, against the relay.

One Locust user is one *session* at a time: a host and a participant connection
(:class:`beach_client.Session`, the protocol client of load/beach_client.py, which also lists
the request types and names the users report in Locust's statistics). The users decide when
a session opens and ends and what traffic it carries (idle, streaming, or mixed), and send
its frames when due; a reconnect storm drops the open session's connections.

The users know nothing of Locust's options: load/locustfile.py sets
:attr:`BeachSession.configure`, which turns the options into a :class:`ClientConfig` (the
relay's URL, checked to be loopback unless allowed; the token source; the traffic settings).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import ClassVar

from beach_client import (
    HELLO_TIMEOUT_S,
    ClientConfig,
    HelloFailed,
    Reporter,
    Session,
    _backoff,
    ms_since,
)
from locust import User, task
from locust.env import Environment
from locust.exception import StopUser
from shapes import Traffic

# The users, plus names of the protocol client (load/beach_client.py) that
# load/locustfile.py imports from here.
__all__ = ["DEFAULT_HOST", "HELLO_TIMEOUT_S", "USER_CLASSES", "BeachSession", "ClientConfig",
           "ConfigFactory", "HelloFailed", "IdleSession", "MixedSession", "Reporter",
           "StreamSession", "ms_since"]

DEFAULT_HOST = "ws://127.0.0.1:9443"

ConfigFactory = Callable[[Environment, "str | None"], ClientConfig]


class BeachSession(User):
    """A Locust user that runs one session at a time against the relay at ``--host``.

    Subclasses fix the traffic: idle, streaming, or mixed (sessions with random lifetimes,
    some streaming). A session that cannot open is retried with backoff.
    """

    abstract = True
    host = DEFAULT_HOST
    traffic: ClassVar[Traffic] = Traffic.IDLE
    configure: ClassVar[ConfigFactory | None] = None
    """Builds the :class:`ClientConfig` from Locust's options; set by load/locustfile.py."""

    def on_start(self) -> None:
        """Read the configuration; a refused target or bad setting stops this user."""
        self.report = Reporter(self.environment)
        configure = type(self).configure
        try:
            if configure is None:
                raise ValueError("no configuration: run this user through load/locustfile.py")
            self.config = configure(self.environment, self.host)
        except (ValueError, OSError) as e:  # a refused target, a bad setting, no key
            self.report.fail("config", "refused", 0, e)
            raise StopUser(f"beach-rescue load: {e}") from None
        self.session: Session | None = None
        self._next_open = time.monotonic()
        self._ends_at = math.inf
        self._open_failures = 0

    def wait_time(self) -> float:
        """Sleep until the next frame is due, the session ends or the next open (<= 1 s)."""
        now = time.monotonic()
        if self.session is None:
            due = self._next_open - now
        else:
            due = min(self.session.seconds_until_due(now), self._ends_at - now)
        return min(max(due, 0.0), 1.0)

    @task
    def step(self) -> None:
        """Open a session when due, end it when its lifetime is over, send due frames."""
        now = time.monotonic()
        session = self.session
        if session is not None and (session.broken or now >= self._ends_at):
            self._end_session(now, failed=session.broken)
        elif session is not None:
            session.send_due(now)
        elif now >= self._next_open:
            self._open_session(now)

    def _open_session(self, now: float) -> None:
        traffic = self.config.traffic
        active = self.traffic == Traffic.STREAM or (
            self.traffic == Traffic.MIXED and random.random() < traffic.active_share)
        session = self.session = Session(self.config, self.report, active)  # on_stop closes it
        failure = session.open()
        if failure is not None:
            self.session = None
            self._open_failures += 1
            self._next_open = time.monotonic() + (
                failure.retry_after + random.uniform(0, 1) if failure.retry_after is not None
                else _backoff(self._open_failures))
            return
        self._open_failures = 0
        if self.traffic == Traffic.MIXED:
            mean = traffic.session_mean_s
            self._ends_at = now + min(max(random.expovariate(1 / mean), 1.0), 10 * mean)

    def _end_session(self, now: float, *, failed: bool) -> None:
        assert self.session is not None
        self.session.close()
        self.session, self._ends_at = None, math.inf
        gap = self.config.traffic.gap_mean_s
        pause = _backoff(2) if failed else (random.expovariate(1 / gap) if gap > 0 else 0.0)
        self._next_open = time.monotonic() + pause

    def storm(self, spread_s: float) -> bool:
        """Drop both connections of the open session at once (no close handshake, like a
        network change); each reconnects after a random delay up to ``spread_s``."""
        session = self.session
        if session is None or not session.opened or session.closing:
            return False
        for peer in (session.host, session.participant):
            peer.drop("storm", random.uniform(0, spread_s))
        return True

    def on_stop(self) -> None:
        """Close the session (1000) when Locust stops this user."""
        session = getattr(self, "session", None)
        if session is not None:
            session.close()
            self.session = None


class IdleSession(BeachSession):
    """A session that only heartbeats (idle_hold, reconnect_storm, idle ramps)."""

    traffic = Traffic.IDLE


class StreamSession(BeachSession):
    """A session that streams (active_stream, ramp_to_capacity)."""

    traffic = Traffic.STREAM


class MixedSession(BeachSession):
    """A slot of mixed_day: sessions with random lifetimes, some streaming, one after another."""

    traffic = Traffic.MIXED


USER_CLASSES: dict[Traffic, type[BeachSession]] = {
    Traffic.IDLE: IdleSession, Traffic.STREAM: StreamSession, Traffic.MIXED: MixedSession}
"""The user class that runs each kind of traffic."""
