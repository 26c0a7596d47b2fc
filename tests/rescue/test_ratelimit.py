"""Tests for rescue.ratelimit: token buckets driven by a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.config import load_config
from rescue.ratelimit import ConnectionRateLimit, TokenBucket

T0 = 1024.0  # times below are dyadic offsets from T0, so refills are exact


def make_limit(**overrides: float) -> ConnectionRateLimit:
    params: dict[str, float] = {"messages_per_s": 10.0, "messages_burst": 20.0,
                                "bytes_per_s": 1000.0, "bytes_burst": 4000.0, "now": T0}
    params.update(overrides)
    return ConnectionRateLimit(**params)


# --- TokenBucket ----------------------------------------------------------------------------

def test_bucket_starts_full_and_grants_exactly_its_burst() -> None:
    bucket = TokenBucket(rate=5.0, burst=10.0, now=T0)
    granted = sum(bucket.take(1, T0) for _ in range(25))
    assert granted == 10
    assert bucket.take(1, T0) is False


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=4.0, burst=10.0, now=T0)
    assert bucket.take(10, T0)
    assert not bucket.take(1, T0 + 0.125)  # 0.5 tokens so far
    assert bucket.take(1, T0 + 0.25)  # 1.0 token
    assert not bucket.take(1, T0 + 0.25)
    assert bucket.take(5, T0 + 1.5)  # 5 more
    assert not bucket.take(0.5, T0 + 1.5)


def test_bucket_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=10.0, now=T0)
    assert bucket.take(10, T0)
    # 60 s at 100/s would be 6000 tokens; the bucket holds 10.
    assert bucket.take(10, T0 + 60)
    assert not bucket.take(1, T0 + 60)


def test_bucket_refusal_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=10.0, now=T0)
    assert bucket.take(7, T0)
    assert not bucket.take(4, T0)  # 3 left: refused
    assert bucket.take(3, T0)  # the refused call took nothing
    assert not bucket.take(0.001, T0)


def test_bucket_never_grants_more_than_burst_at_once() -> None:
    bucket = TokenBucket(rate=1e6, burst=10.0, now=T0)
    assert not bucket.take(10.5, T0 + 3600)
    assert bucket.take(10, T0 + 3600)


def test_bucket_long_idle_does_not_overflow() -> None:
    bucket = TokenBucket(rate=2_097_152.0, burst=8_388_608.0, now=0.0)
    assert bucket.take(8_388_608, 0.0)
    assert bucket.take(1, 1e12)  # ~31,700 years idle
    assert bucket.tokens == 8_388_607.0
    assert math.isfinite(bucket.tokens)
    assert not bucket.take(8_388_608, 1e12)


def test_bucket_clock_stepping_back_grants_nothing_extra() -> None:
    bucket = TokenBucket(rate=8.0, burst=10.0, now=T0)
    assert bucket.take(10, T0)
    assert not bucket.take(1, T0 - 50)  # backwards: no refill
    assert not bucket.take(1, T0 + 0.0625)  # reference point stayed at T0: 0.5 tokens
    assert bucket.take(1, T0 + 0.125)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0),
                                             (float("nan"), 1.0)])
def test_bucket_rejects_non_positive_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate, burst, T0)


# --- ConnectionRateLimit --------------------------------------------------------------------

def test_message_burst_then_refusal() -> None:
    limit = make_limit()
    results = [limit.allow(1, T0) for _ in range(25)]
    assert results == [True] * 20 + [False] * 5


def test_byte_burst_then_refusal() -> None:
    limit = make_limit()
    assert limit.allow(3000, T0)
    assert limit.allow(1000, T0)
    assert not limit.allow(1, T0)


def test_refill_of_both_buckets() -> None:
    limit = make_limit(messages_per_s=8.0, bytes_per_s=1024.0)
    assert limit.allow(4000, T0)  # messages 19, bytes 0
    assert not limit.allow(300, T0 + 0.25)  # 256 bytes refilled: refused
    assert limit.allow(512, T0 + 0.5)  # 512 bytes refilled; messages back at 20 (capped)
    for _ in range(19):
        assert limit.allow(0, T0 + 0.5)
    assert not limit.allow(0, T0 + 0.5)  # messages exhausted
    assert not limit.allow(0, T0 + 0.0625 + 0.5)  # half a message refilled
    assert limit.allow(0, T0 + 0.125 + 0.5)  # one message after 1/8 s at 8/s


def test_byte_refusal_does_not_charge_messages() -> None:
    limit = make_limit(messages_burst=2.0)
    assert limit.allow(4000, T0)
    for _ in range(10):
        assert not limit.allow(100, T0)  # bytes refuse
    assert limit.messages.tokens == 1.0  # only the first message was charged
    assert limit.allow(0, T0)
    assert not limit.allow(0, T0)


def test_message_refusal_does_not_charge_bytes() -> None:
    limit = make_limit(messages_burst=1.0)
    assert limit.allow(10, T0)
    for _ in range(10):
        assert not limit.allow(100, T0)  # messages refuse
    assert limit.bytes.tokens == 3990.0


def test_message_larger_than_byte_burst_is_always_refused() -> None:
    limit = make_limit()
    assert not limit.allow(4001, T0 + 1e6)
    assert limit.allow(4000, T0 + 1e6)


def test_long_idle_does_not_overflow_either_bucket() -> None:
    limit = make_limit()
    assert limit.allow(4000, T0)
    assert limit.allow(0, T0 + 1e9)
    assert limit.messages.tokens == 19.0
    assert limit.bytes.tokens == 4000.0


def test_from_config_uses_rate_settings() -> None:
    config = load_config(environ={}, overrides={
        "rate_messages_per_s": 3.0, "rate_messages_burst": 4,
        "rate_bytes_per_s": 100_000.0, "rate_bytes_burst": 70_000})
    limit = ConnectionRateLimit.from_config(config, now=T0)
    assert (limit.messages.rate, limit.messages.burst) == (3.0, 4.0)
    assert (limit.bytes.rate, limit.bytes.burst) == (100_000.0, 70_000.0)
    assert [limit.allow(10, T0) for _ in range(5)] == [True] * 4 + [False]


def test_from_config_defaults_match_the_protocol() -> None:
    limit = ConnectionRateLimit.from_config(load_config(environ={}), now=T0)
    # 500 messages/s, burst 1000; 2 MiB/s, burst 8 MiB.
    assert (limit.messages.rate, limit.messages.burst) == (500.0, 1000.0)
    assert (limit.bytes.rate, limit.bytes.burst) == (2 * 1024 * 1024, 8 * 1024 * 1024)


# --- properties -----------------------------------------------------------------------------

calls = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
              st.integers(min_value=0, max_value=70_000)),
    max_size=300)


@settings(max_examples=300, deadline=None)
@given(calls=calls,
       bytes_per_s=st.floats(min_value=1.0, max_value=5e6),
       bytes_burst=st.integers(min_value=65_544, max_value=10_000_000),
       messages_per_s=st.floats(min_value=0.5, max_value=1000.0),
       messages_burst=st.integers(min_value=1, max_value=2000))
def test_accepted_traffic_never_exceeds_burst_plus_rate_times_elapsed(
        calls: list[tuple[float, int]], bytes_per_s: float, bytes_burst: int,
        messages_per_s: float, messages_burst: int) -> None:
    now = start = 12_345.678
    limit = ConnectionRateLimit(messages_per_s=messages_per_s, messages_burst=messages_burst,
                                bytes_per_s=bytes_per_s, bytes_burst=bytes_burst, now=now)
    accepted_bytes = 0
    accepted_messages = 0
    for dt, size in calls:
        now += dt
        if limit.allow(size, now):
            accepted_bytes += size
            accepted_messages += 1
        elapsed = now - start
        # Float rounding in the refill may differ from the bound by a few ulps.
        byte_bound = bytes_burst + bytes_per_s * elapsed
        message_bound = messages_burst + messages_per_s * elapsed
        assert accepted_bytes <= byte_bound * (1 + 1e-12)
        assert accepted_messages <= message_bound * (1 + 1e-12)
        assert 0.0 <= limit.bytes.tokens <= bytes_burst
        assert 0.0 <= limit.messages.tokens <= messages_burst


@settings(max_examples=200, deadline=None)
@given(calls=calls)
def test_allow_equals_two_buckets_with_check_before_charge(
        calls: list[tuple[float, int]]) -> None:
    """allow() behaves like take() on both buckets, charging only when both have enough."""
    limit = make_limit(bytes_burst=100_000.0, bytes_per_s=50_000.0)
    messages = TokenBucket(10.0, 20.0, T0)
    nbytes = TokenBucket(50_000.0, 100_000.0, T0)
    now = T0
    for dt, size in calls:
        now += dt
        # Refill without charging, then decide like allow() does.
        messages.take(0, now)
        nbytes.take(0, now)
        expected = messages.tokens >= 1 and nbytes.tokens >= size
        if expected:
            assert messages.take(1, now) and nbytes.take(size, now)
        assert limit.allow(size, now) is expected
        assert limit.bytes.tokens == nbytes.tokens
        assert limit.messages.tokens == messages.tokens
