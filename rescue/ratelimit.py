"""Per-connection rate limits: token buckets for messages and bytes (sans-I/O).

A :class:`TokenBucket` holds up to ``burst`` tokens and gains ``rate`` tokens per second
of the caller's clock; :class:`ConnectionRateLimit` pairs one bucket counting messages
with one counting bytes and is consulted once per received message, so it is written for
the hot path: ``__slots__``, plain floats, no allocation and no nested calls in
:meth:`ConnectionRateLimit.allow`.

Time is always passed in (``now``, seconds on any monotonic clock). A clock that steps
backwards refills nothing and does not move the bucket's reference point back, so a
later ``now`` cannot be credited twice. Over any interval ``[t0, t1]`` a bucket never
grants more than ``burst + rate * (t1 - t0)`` (the bucket starts full).
"""

from __future__ import annotations

from collections.abc import Callable

from rescue.config import Config

__all__ = ["ConnectionRateLimit", "TokenBucket"]


class TokenBucket:
    """A token bucket of capacity ``burst`` refilled at ``rate`` tokens/s; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        """Create a full bucket; ``rate`` and ``burst`` must be positive."""
        if not rate > 0 or not burst > 0:
            raise ValueError(f"rate and burst must be positive (rate={rate}, burst={burst})")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = float(now)

    def take(self, amount: float, now: float) -> bool:
        """Refill for the time elapsed since the last call, then take ``amount`` tokens.

        Returns True when the tokens were taken; False (taking nothing) when fewer than
        ``amount`` are available. An ``amount`` above ``burst`` is never granted.
        """
        elapsed = now - self.stamp
        if elapsed > 0.0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        if amount <= self.tokens:
            self.tokens -= amount
            return True
        return False


class ConnectionRateLimit:
    """Message and byte buckets of one connection; a message passes only if both allow it."""

    __slots__ = ("bytes", "messages")

    def __init__(self, *, messages_per_s: float, messages_burst: float, bytes_per_s: float,
                 bytes_burst: float, now: float) -> None:
        """Create both buckets full at time ``now``."""
        self.messages = TokenBucket(messages_per_s, messages_burst, now)
        self.bytes = TokenBucket(bytes_per_s, bytes_burst, now)

    @classmethod
    def from_config(cls, config: Config, now: float) -> ConnectionRateLimit:
        """Build the limit from the ``rate_*`` settings of ``config``, full at ``now``."""
        return cls.factory(config)(now)

    @classmethod
    def factory(cls, config: Config) -> Callable[[float], ConnectionRateLimit]:
        """Return ``make(now)``, which builds a limit from ``config``, full at ``now``.

        The settings are converted to floats once and shared by every limit it makes
        (converting them per connection would cost a float object per bucket).
        """
        settings = {"messages_per_s": float(config.rate_messages_per_s),
                    "messages_burst": float(config.rate_messages_burst),
                    "bytes_per_s": float(config.rate_bytes_per_s),
                    "bytes_burst": float(config.rate_bytes_burst)}

        def make(now: float) -> ConnectionRateLimit:
            return cls(now=now, **settings)

        return make

    def allow(self, nbytes: int, now: float) -> bool:
        """Charge one message of ``nbytes`` bytes at ``now``; False if either bucket refuses.

        When it refuses, neither bucket is charged (both are still refilled to ``now``).
        """
        # Both buckets are refilled and checked inline (this runs once per message).
        m = self.messages
        b = self.bytes
        elapsed = now - m.stamp
        if elapsed > 0.0:
            tokens = m.tokens + elapsed * m.rate
            m.tokens = tokens if tokens < m.burst else m.burst
            m.stamp = now
        elapsed = now - b.stamp
        if elapsed > 0.0:
            tokens = b.tokens + elapsed * b.rate
            b.tokens = tokens if tokens < b.burst else b.burst
            b.stamp = now
        if m.tokens >= 1.0 and b.tokens >= nbytes:
            m.tokens -= 1.0
            b.tokens -= nbytes
            return True
        return False
