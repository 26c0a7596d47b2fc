"""Tests for rescue.wsframe: server frames checked by an RFC 6455 decoder and by aiohttp's."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import pytest
from aiohttp import EofStream, WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.wsframe import (
    OP_BINARY,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    binary_frame,
    control_frame,
    frame_header,
    text_frame,
)

BOUNDARY_LENGTHS = [0, 1, 125, 126, 127, 65535, 65536]


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes
    header_len: int


def decode(buf: bytes) -> tuple[Frame, bytes]:
    """Parse one frame from ``buf`` per RFC 6455 section 5.2; return it and the rest.

    Written from the RFC, independently of the module under test. Refuses non-minimal
    length encodings and a 64-bit length with its top bit set, as the RFC requires.
    """
    if len(buf) < 2:
        raise ValueError("truncated header")
    b0, b1 = buf[0], buf[1]
    fin = bool(b0 & 0x80)
    rsv = (b0 >> 4) & 0x7
    opcode = b0 & 0x0F
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            raise ValueError("truncated 16-bit length")
        (length,) = struct.unpack_from("!H", buf, 2)
        pos = 4
        if length < 126:
            raise ValueError("16-bit length used for a short payload")
    elif length == 127:
        if len(buf) < 10:
            raise ValueError("truncated 64-bit length")
        (length,) = struct.unpack_from("!Q", buf, 2)
        pos = 10
        if length >> 63:
            raise ValueError("64-bit length has its most significant bit set")
        if length < 65536:
            raise ValueError("64-bit length used for a payload that fits 16 bits")
    mask = b""
    if masked:
        mask = buf[pos:pos + 4]
        pos += 4
    if len(buf) < pos + length:
        raise ValueError("truncated payload")
    payload = buf[pos:pos + length]
    if masked:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return Frame(fin, rsv, opcode, masked, payload, pos), buf[pos + length:]


def decode_one(buf: bytes) -> Frame:
    frame, rest = decode(buf)
    assert rest == b"", "trailing bytes after the frame"
    return frame


def assert_server_frame(frame: Frame, opcode: int, payload: bytes) -> None:
    assert frame.fin is True
    assert frame.rsv == 0
    assert frame.masked is False  # RFC 6455 5.1: a server never masks
    assert frame.opcode == opcode
    assert frame.payload == payload


def expected_header_len(n: int) -> int:
    return 2 if n < 126 else 4 if n < 65536 else 10


def payload_of(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def aiohttp_read(data: bytes, chunk: int | None = None) -> list[tuple[WSMsgType, object]]:
    """Feed ``data`` to aiohttp's own WebSocket reader; return the messages it produced."""

    class Protocol:
        _reading_paused = False

        def pause_reading(self) -> None:
            self._reading_paused = True

        def resume_reading(self) -> None:
            self._reading_paused = False

    async def run() -> list[tuple[WSMsgType, object]]:
        queue = WebSocketDataQueue(Protocol(), 1 << 24,  # type: ignore[arg-type]
                                   loop=asyncio.get_running_loop())
        reader = WebSocketReader(queue, 0, compress=False, decode_text=True)
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            failed, _ = reader.feed_data(data[i:i + step])
            assert not failed, queue.exception()
        reader.feed_eof()
        messages: list[tuple[WSMsgType, object]] = []
        while True:
            try:
                msg = await asyncio.wait_for(queue.read(), timeout=5)
            except EofStream:
                return messages
            messages.append((msg.type, msg.data))

    return asyncio.run(run())


# --- header encoding at the length boundaries ---------------------------------------------

@pytest.mark.parametrize("n", BOUNDARY_LENGTHS)
def test_binary_frame_at_length_boundaries(n: int) -> None:
    payload = payload_of(n)
    data = binary_frame(payload)
    frame = decode_one(data)
    assert_server_frame(frame, OP_BINARY, payload)
    assert frame.header_len == expected_header_len(n)
    assert len(data) == n + expected_header_len(n)
    assert data == frame_header(OP_BINARY, n) + payload


@pytest.mark.parametrize("n", BOUNDARY_LENGTHS)
def test_text_frame_at_length_boundaries(n: int) -> None:
    text = ("abcdefghij" * (n // 10 + 1))[:n]
    frame = decode_one(text_frame(text))
    assert_server_frame(frame, OP_TEXT, text.encode())
    assert frame.header_len == expected_header_len(n)


@pytest.mark.parametrize(("n", "header"), [
    (0, b"\x82\x00"),
    (1, b"\x82\x01"),
    (125, b"\x82\x7d"),
    (126, b"\x82\x7e\x00\x7e"),
    (127, b"\x82\x7e\x00\x7f"),
    (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (2**63 - 1, b"\x82\x7f\x7f\xff\xff\xff\xff\xff\xff\xff"),
])
def test_frame_header_bytes(n: int, header: bytes) -> None:
    assert frame_header(OP_BINARY, n) == header


def test_frame_header_carries_the_opcode() -> None:
    for opcode in (OP_TEXT, OP_BINARY, OP_PING, OP_PONG):
        assert frame_header(opcode, 3)[0] == 0x80 | opcode
        assert frame_header(opcode, 300)[0] == 0x80 | opcode
        assert frame_header(opcode, 70000)[0] == 0x80 | opcode


def test_text_frame_length_counts_utf8_bytes_not_characters() -> None:
    text = "é" * 100  # 100 characters, 200 bytes: needs the 16-bit length form
    frame = decode_one(text_frame(text))
    assert frame.header_len == 4
    assert frame.payload.decode() == text


# --- control frames -----------------------------------------------------------------------

@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG])
@pytest.mark.parametrize("n", [0, 1, 125])
def test_control_frames_up_to_125_bytes(opcode: int, n: int) -> None:
    payload = payload_of(n)
    frame = decode_one(control_frame(opcode, payload))
    assert_server_frame(frame, opcode, payload)
    assert frame.header_len == 2


def test_control_frame_default_payload_is_empty() -> None:
    assert control_frame(OP_PONG) == b"\x8a\x00"
    assert control_frame(OP_PING) == b"\x89\x00"


@pytest.mark.parametrize("n", [126, 127, 65536])
def test_control_frame_refuses_payloads_over_125_bytes(n: int) -> None:
    with pytest.raises(ValueError, match="125"):
        control_frame(OP_PING, b"x" * n)


# --- property tests -----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=0, max_value=200_000))
def test_binary_frame_round_trips_any_length(n: int) -> None:
    payload = b"\xa5" * n
    frame = decode_one(binary_frame(payload))
    assert_server_frame(frame, OP_BINARY, payload)
    assert frame.header_len == expected_header_len(n)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=70_000))
def test_binary_frame_round_trips_any_payload(payload: bytes) -> None:
    assert_server_frame(decode_one(binary_frame(payload)), OP_BINARY, payload)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_text_frame_round_trips_any_text(text: str) -> None:
    assert_server_frame(decode_one(text_frame(text)), OP_TEXT, text.encode())


@settings(max_examples=100, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=8))
def test_concatenated_frames_split_back_into_the_same_messages(payloads: list[bytes]) -> None:
    stream = b"".join(binary_frame(p) for p in payloads)
    decoded = []
    while stream:
        frame, stream = decode(stream)
        decoded.append(frame.payload)
    assert decoded == payloads


# --- aiohttp's reader as a second, independent decoder ------------------------------------

def test_aiohttp_reader_decodes_every_boundary_length() -> None:
    stream = b"".join(binary_frame(payload_of(n)) for n in BOUNDARY_LENGTHS)
    messages = aiohttp_read(stream)
    assert [t for t, _ in messages] == [WSMsgType.BINARY] * len(BOUNDARY_LENGTHS)
    assert [d for _, d in messages] == [payload_of(n) for n in BOUNDARY_LENGTHS]


def test_aiohttp_reader_decodes_text_and_control_frames() -> None:
    stream = (text_frame("héllo") + control_frame(OP_PING, b"p" * 125)
              + control_frame(OP_PONG) + text_frame("x" * 65536))
    messages = aiohttp_read(stream, chunk=7)  # split mid-header and mid-payload
    assert messages == [
        (WSMsgType.TEXT, "héllo"),
        (WSMsgType.PING, b"p" * 125),
        (WSMsgType.PONG, b""),
        (WSMsgType.TEXT, "x" * 65536),
    ]


@settings(max_examples=50, deadline=None)
@given(payloads=st.lists(st.binary(max_size=2000), min_size=1, max_size=5),
       big=st.sampled_from([0, 126, 65535, 65536, 100_000]),
       chunk=st.integers(min_value=1, max_value=4096))
def test_aiohttp_reader_agrees_on_random_streams(payloads: list[bytes], big: int,
                                                 chunk: int) -> None:
    payloads = [*payloads, b"\x00" * big]
    messages = aiohttp_read(b"".join(binary_frame(p) for p in payloads), chunk=chunk)
    assert messages == [(WSMsgType.BINARY, p) for p in payloads]
