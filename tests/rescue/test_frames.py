"""Tests for rescue.frames: the 8-byte frame header of protocol v1, section 5."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rescue.codes import CloseCode
from rescue.frames import (
    HEADER_SIZE,
    VERSION,
    Frame,
    FrameError,
    Kind,
    check_frame,
    decode_frame,
    encode_frame,
)

PROPERTY = settings(deadline=None, max_examples=300)


def header(version: int, kind: int, payload_len: int, seq: int = 0) -> bytes:
    """Build a header by hand, independently of the module under test."""
    return (bytes([version, kind]) + payload_len.to_bytes(2, "big") + seq.to_bytes(4, "big"))


def reference_verdict(data: bytes) -> int | CloseCode:
    """The contract, written out plainly: the kind of a good frame, else the close code."""
    if len(data) < 8:
        return CloseCode.PROTOCOL_ERROR
    if data[0] != 1 or int.from_bytes(data[2:4], "big") != len(data) - 8:
        return CloseCode.PROTOCOL_ERROR
    if data[1] not in (0, 1, 2, 3, 4):
        return CloseCode.UNSUPPORTED_DATA
    return data[1]


def check_verdict(data: bytes) -> int | CloseCode:
    try:
        return check_frame(data)
    except FrameError as e:
        return e.close_code


# --- examples ---------------------------------------------------------------------------------


def test_constants_match_the_contract() -> None:
    assert VERSION == 1
    assert HEADER_SIZE == 8
    assert [(k.name, int(k)) for k in Kind] == [
        ("CONTROL", 0), ("DATA", 1), ("HEARTBEAT", 2), ("CLOSE", 3), ("ACK", 4)]


def test_encode_frame_lays_out_the_header_big_endian() -> None:
    wire = encode_frame(Kind.DATA, 0x01020304, b"hello")
    assert wire == b"\x01\x01\x00\x05\x01\x02\x03\x04hello"


def test_encode_frame_accepts_a_plain_int_kind_and_an_empty_payload() -> None:
    assert encode_frame(2, 7, b"") == b"\x01\x02\x00\x00\x00\x00\x00\x07"


def test_encode_frame_accepts_the_largest_payload_and_seq() -> None:
    wire = encode_frame(Kind.ACK, 0xFFFFFFFF, b"x" * 65535)
    assert wire[:8] == b"\x01\x04\xff\xff\xff\xff\xff\xff"
    assert len(wire) == 8 + 65535


@pytest.mark.parametrize(("kind", "seq", "payload", "message"), [
    (Kind.DATA, 0, b"x" * 65536, "payload of 65536 bytes"),
    (Kind.DATA, -1, b"", "seq -1"),
    (Kind.DATA, 2**32, b"", "seq 4294967296"),
    (5, 0, b"", "5"),
    (-1, 0, b"", "-1"),
])
def test_encode_frame_refuses_out_of_range_values(
        kind: int, seq: int, payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_frame(kind, seq, payload)


@pytest.mark.parametrize("kind", list(Kind))
def test_check_frame_returns_the_kind_as_a_plain_int(kind: Kind) -> None:
    result = check_frame(encode_frame(kind, 1, b"abc"))
    assert result == kind
    assert type(result) is int


def test_check_frame_accepts_bytearray_and_memoryview() -> None:
    wire = encode_frame(Kind.CLOSE, 9, b"bye")
    assert check_frame(bytearray(wire)) == 3  # type: ignore[arg-type]
    assert check_frame(memoryview(wire)) == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "code", "detail"), [
    (b"", CloseCode.PROTOCOL_ERROR, "frame of 0 bytes is shorter than the 8-byte header"),
    (b"\x01\x01\x00", CloseCode.PROTOCOL_ERROR, "frame of 3 bytes is shorter"),
    (b"\x01\x01\x00\x00\x00\x00\x00", CloseCode.PROTOCOL_ERROR, "frame of 7 bytes is shorter"),
    (header(0, 1, 0), CloseCode.PROTOCOL_ERROR,
     "unsupported frame version 0; this relay speaks 1"),
    (header(2, 1, 3) + b"abc", CloseCode.PROTOCOL_ERROR, "unsupported frame version 2"),
    (header(1, 1, 4) + b"abc", CloseCode.PROTOCOL_ERROR,
     "header says payload_len 4 but the payload has 3 bytes"),
    (header(1, 1, 2) + b"abc", CloseCode.PROTOCOL_ERROR,
     "header says payload_len 2 but the payload has 3 bytes"),
    (header(1, 0, 65535), CloseCode.PROTOCOL_ERROR, "payload_len 65535"),
    (header(1, 5, 0), CloseCode.UNSUPPORTED_DATA, "unknown frame kind 5"),
    (header(1, 255, 1) + b"z", CloseCode.UNSUPPORTED_DATA, "unknown frame kind 255"),
    # A header that is wrong in several ways is a protocol error first.
    (header(1, 9, 5) + b"z", CloseCode.PROTOCOL_ERROR, "payload_len 5"),
    (header(7, 9, 0), CloseCode.PROTOCOL_ERROR, "version 7"),
])
def test_check_frame_refusals(data: bytes, code: CloseCode, detail: str) -> None:
    with pytest.raises(FrameError) as info:
        check_frame(data)
    assert info.value.close_code is code
    assert detail in info.value.detail
    assert code.reason in str(info.value)


def test_decode_frame_returns_a_frame_with_enum_kind_and_bytes_payload() -> None:
    frame = decode_frame(encode_frame(Kind.HEARTBEAT, 42, b"\x00\xff"))
    assert frame == Frame(kind=Kind.HEARTBEAT, seq=42, payload=b"\x00\xff")
    assert type(frame.kind) is Kind
    assert type(frame.payload) is bytes


def test_decode_frame_copies_the_payload_out_of_a_mutable_buffer() -> None:
    buffer = bytearray(encode_frame(Kind.DATA, 1, b"abc"))
    frame = decode_frame(buffer)  # type: ignore[arg-type]
    buffer[8] = ord("X")
    assert frame.payload == b"abc"


def test_decode_frame_refuses_like_check_frame() -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(header(1, 6, 0))
    assert info.value.close_code is CloseCode.UNSUPPORTED_DATA


def test_frame_is_immutable() -> None:
    frame = Frame(Kind.DATA, 1, b"")
    with pytest.raises(AttributeError):
        frame.seq = 2  # type: ignore[misc]


# --- properties -----------------------------------------------------------------------------

kinds = st.sampled_from(list(Kind))
seqs = st.integers(min_value=0, max_value=2**32 - 1)
# Long payloads are built rather than drawn byte by byte, which would be slow.
long_payloads = st.integers(min_value=301, max_value=65535).map(
    lambda n: (bytes(range(256)) * 256)[:n])
payloads = st.binary(max_size=300) | long_payloads


@PROPERTY
@given(kind=kinds, seq=seqs, payload=payloads)
def test_encode_then_decode_round_trips(kind: Kind, seq: int, payload: bytes) -> None:
    wire = encode_frame(kind, seq, payload)
    assert len(wire) == HEADER_SIZE + len(payload)
    assert check_frame(wire) == kind
    assert decode_frame(wire) == Frame(kind, seq, payload)


@PROPERTY
@given(data=st.binary(max_size=40))
@example(data=b"\x01\x04\x00\x00\x00\x00\x00\x00")
@example(data=b"\x01\x05\x00\x00\x00\x00\x00\x00")
def test_check_frame_agrees_with_the_reference_on_arbitrary_bytes(data: bytes) -> None:
    assert check_verdict(data) == reference_verdict(data)


@PROPERTY
@given(version=st.sampled_from([1, 1, 1, 0, 2, 255]), kind=st.integers(0, 255),
       declared=st.integers(0, 65535) | st.integers(0, 20), seq=seqs,
       payload=st.binary(max_size=20))
def test_check_frame_agrees_with_the_reference_on_hand_built_headers(
        version: int, kind: int, declared: int, seq: int, payload: bytes) -> None:
    data = header(version, kind, declared, seq) + payload
    assert check_verdict(data) == reference_verdict(data)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame, then one random edit: overwrite a byte, truncate or append."""
    wire = bytearray(encode_frame(draw(kinds), draw(seqs), draw(st.binary(max_size=30))))
    edit = draw(st.sampled_from(["overwrite", "truncate", "append"]))
    if edit == "overwrite":
        index = draw(st.integers(0, len(wire) - 1))
        wire[index] = draw(st.integers(0, 255))
    elif edit == "truncate":
        del wire[draw(st.integers(0, len(wire) - 1)):]
    else:
        wire += draw(st.binary(min_size=1, max_size=10))
    return bytes(wire)


@PROPERTY
@given(data=mutated_frames())
def test_check_frame_agrees_with_the_reference_on_mutated_frames(data: bytes) -> None:
    verdict = check_verdict(data)
    assert verdict == reference_verdict(data)
    if isinstance(verdict, int) and not isinstance(verdict, CloseCode):
        assert decode_frame(data).kind == verdict
