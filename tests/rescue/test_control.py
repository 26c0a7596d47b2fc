"""Tests for rescue.control: the JSON messages between the supervisor and its workers."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.control import (
    MAX_PACKET,
    Beat,
    Cluster,
    Drain,
    IntakeStopped,
    Message,
    Ready,
    Serve,
    Stop,
    decode,
    encode,
)

PROPERTY = settings(deadline=None, max_examples=120)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)
stats_dicts = st.dictionaries(st.text(max_size=20), json_values, max_size=8)
seconds = st.floats(0.0, 3600.0)

messages: st.SearchStrategy[Message] = st.one_of(
    st.just(Ready()), st.just(IntakeStopped()), st.just(Serve()), st.just(Stop()),
    st.builds(Beat, stats=stats_dicts),
    st.builds(Drain, window_s=seconds, deadline_s=seconds),
    st.builds(Cluster, workers=st.lists(stats_dicts, max_size=5)),
)


@given(message=messages)
@PROPERTY
def test_every_message_round_trips(message: Message) -> None:
    packet = encode(message)
    assert isinstance(packet, bytes)
    decoded = decode(packet)
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize(("message", "tag"), [
    (Ready(), "ready"), (Beat(), "beat"), (IntakeStopped(), "intake_stopped"),
    (Serve(), "serve"), (Drain(window_s=5.0, deadline_s=30.0), "drain"), (Stop(), "stop"),
    (Cluster(workers=[]), "cluster"),
])
def test_packets_are_tagged_json_objects(message: Message, tag: str) -> None:
    """The wire form is a JSON object with a ``type`` tag (readable in an strace)."""
    obj = json.loads(encode(message))
    assert obj["type"] == tag


def test_a_beat_without_stats_has_an_empty_dict() -> None:
    assert decode(b'{"type":"beat"}') == Beat(stats={})
    first, second = Beat(), Beat()
    first.stats["x"] = 1
    assert second.stats == {}  # the default is not shared between instances


def test_drain_accepts_integer_seconds() -> None:
    assert decode(b'{"type":"drain","window_s":5,"deadline_s":30}') == Drain(5.0, 30.0)


@pytest.mark.parametrize("packet", [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"\xff\xfe\x00", id="binary"),
    pytest.param(b'{"type":"ready"', id="truncated"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"null", id="null"),
    pytest.param(b"{}", id="no-tag"),
    pytest.param(b'{"type":"reboot"}', id="unknown-tag"),
    pytest.param(b'{"type":7}', id="tag-not-a-string"),
    pytest.param(b'{"type":"drain"}', id="drain-without-fields"),
    pytest.param(b'{"type":"drain","window_s":"5","deadline_s":30}', id="drain-string"),
    pytest.param(b'{"type":"beat","stats":[]}', id="stats-not-a-dict"),
    pytest.param(b'{"type":"cluster","workers":{}}', id="workers-not-a-list"),
    pytest.param(b'{"type":"ready"} {"type":"ready"}', id="two-messages"),
])
def test_garbage_raises_decode_error(packet: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(packet)


@given(packet=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
@PROPERTY
def test_any_bytes_decode_to_a_message_or_raise_decode_error(packet: bytes) -> None:
    try:
        message = decode(packet)
    except msgspec.DecodeError:
        return
    assert isinstance(message, Ready | Beat | IntakeStopped | Serve | Drain | Stop | Cluster)


def realistic_worker(slot: int, generation: int) -> dict[str, Any]:
    """One row of a Cluster: a worker's beat stats plus the supervisor's fields, with
    numbers as large as a long-lived busy worker would report."""
    return {
        "slot": slot, "pid": 4_194_000 + slot, "connections": 65_000, "peers": 64_000,
        "sessions": 20_000, "handshakes": 512, "draining": False,
        "messages_forwarded": 987_654_321_012, "bytes_forwarded": 123_456_789_012_345_678,
        "accepted": 9_876_543_210, "handed_off": 8_765_432_109, "adopted": 8_765_432_100,
        "handoff_failures": 12_345, "generation": generation, "state": "draining",
    }


def test_a_cluster_of_64_workers_fits_in_one_packet() -> None:
    """64 current plus 64 old-generation workers (a reload in flight) stay under MAX_PACKET."""
    workers = [realistic_worker(s, g) for g in (41, 42) for s in range(64)]
    packet = encode(Cluster(workers=workers))
    assert len(packet) < MAX_PACKET, len(packet)
    assert decode(packet) == Cluster(workers=workers)


def test_a_realistic_beat_fits_in_one_packet() -> None:
    packet = encode(Beat(stats=realistic_worker(63, 1)))
    assert len(packet) < MAX_PACKET
    assert decode(packet) == Beat(stats=realistic_worker(63, 1))
