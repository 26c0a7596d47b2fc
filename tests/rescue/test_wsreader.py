"""Tests for rescue.wsreader: client frames built by a local encoder are read back whole."""

from __future__ import annotations

import importlib.util
import itertools
import random
import struct
import sys
import tracemalloc
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue import wsreader
from rescue.codes import CloseCode
from rescue.wsframe import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT
from rescue.wsreader import FrameReader, ReadError, parse_close, unmask

MASK = b"\x37\xfa\x21\x3d"
LIMIT = 1 << 20
Message = tuple[int, bytes]


# --- a small, independent client-frame encoder --------------------------------------------

def xor_mask(mask: bytes, data: bytes) -> bytes:
    """RFC 6455 5.3 byte by byte: the reference the reader's unmasking is checked against."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 mask: bytes = MASK, masked: bool = True, form: int | None = None,
                 announced: int | None = None) -> bytes:
    """One client frame; ``form`` (7, 16 or 64) forces a length form, ``announced`` the
    length field's value (then ``payload`` is sent as it is, whatever its length)."""
    n = len(payload) if announced is None else announced
    form = form or (7 if n < 126 else 16 if n < 65536 else 64)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if form == 7:
        head = bytes((first, bit | n))
    elif form == 16:
        head = struct.pack(">BBH", first, bit | 126, n)
    else:
        head = struct.pack(">BBQ", first, bit | 127, n)
    return head + (mask + xor_mask(mask, payload) if masked else payload)


def payload_of(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def read_all(reader: FrameReader) -> list[Message]:
    """Every message the reader can return now."""
    out = []
    while (message := reader.next_message()) is not None:
        out.append(message)
    return out


def read_in_pieces(data: bytes, cuts: list[int], limit: int = LIMIT,
                   takes: list[int] | None = None) -> list[Message]:
    """Feed ``data`` cut at ``cuts``; after the i-th feed take up to ``takes[i % len(takes)]``
    messages (all there are when ``takes`` is not given), and the rest at the end."""
    reader = FrameReader(limit)
    out: list[Message] = []
    bounds = [0, *sorted(cuts), len(data)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        reader.feed(data[a:b])
        budget = takes[i % len(takes)] if takes else -1
        while budget and (message := reader.next_message()) is not None:
            out.append(message)
            budget -= 1
    out += read_all(reader)
    assert reader.buffered == 0
    return out


def raised(data: bytes, limit: int = LIMIT) -> ReadError:
    """The ReadError reading ``data`` raises (after any messages before it)."""
    reader = FrameReader(limit)
    reader.feed(data)
    with pytest.raises(ReadError) as info:
        read_all(reader)
    return info.value


@pytest.fixture(params=["c", "python"])
def unmask_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with aiohttp's C mask helper and again with the pure-Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(wsreader, "unmask", wsreader._unmask_python)
    return str(request.param)


# --- unmask ---------------------------------------------------------------------------------

LENGTHS = [*range(71), 4096, 65535, 65537, (1 << 20) + 3]


@pytest.mark.parametrize("n", LENGTHS)
def test_unmask_c_and_python_agree_with_the_reference(n: int) -> None:
    rng = random.Random(n)
    mask = rng.randbytes(4)
    data = rng.randbytes(n)
    expected = xor_mask(mask, data)
    assert unmask(mask, data) == expected
    assert wsreader._unmask_python(mask, data) == expected
    assert wsreader._unmask_python(mask, memoryview(data)) == expected
    assert type(unmask(mask, data)) is bytes


def test_the_c_helper_is_used_when_importable() -> None:
    assert wsreader._HAVE_C_MASK
    assert wsreader.unmask is not wsreader._unmask_python


def load_without_c_helper(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of rescue.wsreader loaded while aiohttp's mask helper cannot be imported."""
    monkeypatch.setitem(sys.modules, "aiohttp._websocket.helpers", None)
    spec = importlib.util.spec_from_file_location("wsreader_without_c", wsreader.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_module_works_when_the_c_import_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_without_c_helper(monkeypatch)
    assert not module._HAVE_C_MASK
    assert module.unmask is module._unmask_python
    reader = module.FrameReader(LIMIT)
    reader.feed(client_frame(OP_TEXT, b"ab", fin=False) + client_frame(OP_PING, b"p")
                + client_frame(OP_CONTINUATION, payload_of(70_000)))
    assert read_all(reader) == [(OP_PING, b"p"), (OP_TEXT, b"ab" + payload_of(70_000))]
    reader.feed(client_frame(OP_BINARY, b"x", masked=False))
    with pytest.raises(module.ReadError):
        reader.next_message()


# --- reading messages -----------------------------------------------------------------------

def test_single_frames_of_each_kind(unmask_impl: str) -> None:
    reader = FrameReader(LIMIT)
    assert reader.next_message() is None
    kinds = [(OP_BINARY, payload_of(4096)), (OP_TEXT, "héllo".encode()), (OP_PING, b"ping"),
             (OP_PONG, b"pong"), (OP_CLOSE, b"\x03\xe8bye")]
    reader.feed(b"".join(client_frame(op, p, mask=bytes((i, 0xFF, 0x10, i)))
                         for i, (op, p) in enumerate(kinds)))
    assert read_all(reader) == kinds
    assert reader.buffered == 0


def test_fragments_are_joined_with_control_frames_interleaved(unmask_impl: str) -> None:
    stream = b"".join([
        client_frame(OP_TEXT, b"Hel", fin=False),
        client_frame(OP_PING, b"p1"),
        client_frame(OP_CONTINUATION, b"lo, ", fin=False, mask=b"\x00\x01\x02\x03"),
        client_frame(OP_PONG),
        client_frame(OP_CLOSE, b"\x03\xe8"),
        client_frame(OP_CONTINUATION, b"world"),
        client_frame(OP_BINARY, b"next", fin=False),
        client_frame(OP_CONTINUATION, b"!"),
    ])
    expected = [(OP_PING, b"p1"), (OP_PONG, b""), (OP_CLOSE, b"\x03\xe8"),
                (OP_TEXT, b"Hello, world"), (OP_BINARY, b"next!")]
    assert read_in_pieces(stream, []) == expected


def test_control_frames_come_out_before_the_data_message_completes() -> None:
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(OP_BINARY, b"abc", fin=False) + client_frame(OP_PING, b"x"))
    assert reader.next_message() == (OP_PING, b"x")
    assert reader.next_message() is None
    assert reader.buffered == 3  # the open message's payload
    reader.feed(client_frame(OP_CONTINUATION, b"def"))
    assert reader.next_message() == (OP_BINARY, b"abcdef")
    assert reader.buffered == 0


def test_zero_length_frames(unmask_impl: str) -> None:
    stream = b"".join([
        client_frame(OP_BINARY), client_frame(OP_TEXT), client_frame(OP_PING),
        client_frame(OP_CLOSE),
        client_frame(OP_TEXT, fin=False), client_frame(OP_CONTINUATION, fin=False),
        client_frame(OP_CONTINUATION),
    ])
    expected = [(OP_BINARY, b""), (OP_TEXT, b""), (OP_PING, b""), (OP_CLOSE, b""), (OP_TEXT, b"")]
    assert read_in_pieces(stream, []) == expected
    assert read_in_pieces(stream, list(range(len(stream)))) == expected


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 65537])
def test_length_forms_at_their_boundaries(n: int, unmask_impl: str) -> None:
    frame = client_frame(OP_BINARY, payload_of(n))
    assert len(frame) - n == (6 if n < 126 else 8 if n < 65536 else 14)
    assert read_in_pieces(frame, []) == [(OP_BINARY, payload_of(n))]
    assert read_in_pieces(frame, [1, 2, 5, 9, 13]) == [(OP_BINARY, payload_of(n))]


def test_byte_at_a_time_equals_one_feed(unmask_impl: str) -> None:
    stream = b"".join([
        client_frame(OP_BINARY, payload_of(300)),
        client_frame(OP_TEXT, b"a", fin=False), client_frame(OP_PING, b"p"),
        client_frame(OP_CONTINUATION, payload_of(200)),
        client_frame(OP_CLOSE, b"\x03\xe8"),
    ])
    whole = read_in_pieces(stream, [])
    assert len(whole) == 4
    assert read_in_pieces(stream, list(range(1, len(stream)))) == whole


def test_feeds_between_takes_keep_their_order(unmask_impl: str) -> None:
    frames = [client_frame(OP_BINARY, bytes([i]) * (i + 1)) for i in range(6)]
    reader = FrameReader(LIMIT)
    reader.feed(frames[0])
    reader.feed(frames[1])
    assert reader.next_message() == (OP_BINARY, b"\x00")
    reader.feed(frames[2][:1])
    reader.feed(frames[2][1:3])
    assert reader.next_message() == (OP_BINARY, b"\x01" * 2)
    reader.feed(frames[2][3:] + frames[3])
    reader.feed(frames[4][:5])
    assert reader.next_message() == (OP_BINARY, b"\x02" * 3)
    reader.feed(frames[4][5:])
    reader.feed(frames[5])
    assert read_all(reader) == [(OP_BINARY, bytes([i]) * (i + 1)) for i in (3, 4, 5)]
    assert reader.buffered == 0


def test_buffered_counts_fed_bytes_until_returned() -> None:
    reader = FrameReader(LIMIT)
    frame = client_frame(OP_BINARY, payload_of(1000))
    reader.feed(frame[:10])
    reader.feed(frame[10:500])
    assert reader.next_message() is None
    assert reader.buffered == 500
    reader.feed(frame[500:] + frame[:7])
    assert reader.next_message() == (OP_BINARY, payload_of(1000))
    assert reader.buffered == 7
    assert reader.next_message() is None


# --- size limit ---------------------------------------------------------------------------

def test_a_message_of_exactly_the_limit_is_allowed_one_more_byte_is_not() -> None:
    assert read_in_pieces(client_frame(OP_BINARY, payload_of(100)), [], limit=100) == [
        (OP_BINARY, payload_of(100))]
    error = raised(client_frame(OP_BINARY, payload_of(101)), limit=100)
    assert error.close_code is CloseCode.MESSAGE_TOO_BIG


def test_the_limit_counts_all_fragments_but_not_control_frames() -> None:
    ok = (client_frame(OP_TEXT, payload_of(60), fin=False) + client_frame(OP_PING, payload_of(100))
          + client_frame(OP_CONTINUATION, payload_of(40)))
    assert read_in_pieces(ok, [], limit=100)[-1] == (OP_TEXT, payload_of(60) + payload_of(40))
    too_big = client_frame(OP_TEXT, payload_of(60), fin=False) + client_frame(
        OP_CONTINUATION, payload_of(41))
    assert raised(too_big, limit=100).close_code is CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("announced", [101, 65535, 1 << 62])
def test_too_big_is_decided_from_the_header_alone(announced: int) -> None:
    reader = FrameReader(100)
    tracemalloc.start()
    try:
        reader.feed(client_frame(OP_BINARY, announced=announced))  # header and mask only
        with pytest.raises(ReadError) as info:
            reader.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
    assert peak < 64 * 1024


def test_a_too_big_continuation_is_refused_from_its_header() -> None:
    reader = FrameReader(100)
    reader.feed(client_frame(OP_BINARY, payload_of(50), fin=False)
                + client_frame(OP_CONTINUATION, announced=51))
    with pytest.raises(ReadError) as info:
        reader.next_message()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG


# --- protocol errors ------------------------------------------------------------------------

PROTOCOL_ERRORS = {
    "unmasked": client_frame(OP_BINARY, b"x", masked=False),
    "unmasked control": client_frame(OP_PING, masked=False),
    "rsv1": client_frame(OP_BINARY, b"x", rsv=4),
    "rsv2": client_frame(OP_TEXT, b"x", rsv=2),
    "rsv3": client_frame(OP_PING, rsv=1),
    **{f"reserved opcode {op:#x}": client_frame(op, b"x")
       for op in [*range(0x3, 0x8), *range(0xB, 0x10)]},
    **{f"fragmented control {op:#x}": client_frame(op, b"", fin=False)
       for op in (OP_PING, OP_PONG, OP_CLOSE)},
    **{f"control over 125 bytes {op:#x}": client_frame(op, payload_of(126))
       for op in (OP_PING, OP_PONG, OP_CLOSE)},
    "continuation without a message": client_frame(OP_CONTINUATION, b"x"),
    "final continuation without a message": client_frame(OP_CONTINUATION, b"x", fin=False),
    "text inside a fragmented message":
        client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
    "binary inside a fragmented message":
        client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_BINARY, b"b", fin=False),
    "16-bit length under 126": client_frame(OP_BINARY, payload_of(125), form=16),
    "16-bit length of 0": client_frame(OP_BINARY, form=16),
    "64-bit length under 65536": client_frame(OP_BINARY, payload_of(65535), form=64),
    "64-bit length under 126": client_frame(OP_BINARY, payload_of(5), form=64),
    "64-bit length with the top bit": client_frame(OP_BINARY, announced=1 << 63),
    "64-bit length all ones": client_frame(OP_BINARY, announced=(1 << 64) - 1),
}


@pytest.mark.parametrize("stream", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_protocol_errors(stream: bytes) -> None:
    error = raised(stream)
    assert error.close_code is CloseCode.PROTOCOL_ERROR
    assert error.detail
    # Whatever comes before the bad frame is still delivered, in order.
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(OP_PING, b"before") + stream)
    assert reader.next_message() == (OP_PING, b"before")
    with pytest.raises(ReadError):
        reader.next_message()


def test_the_error_is_sticky_and_later_feeds_are_ignored() -> None:
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(OP_BINARY, b"a", rsv=4))
    with pytest.raises(ReadError) as first:
        reader.next_message()
    reader.feed(client_frame(OP_BINARY, b"valid"))
    assert reader.buffered == 0
    for _ in range(3):
        with pytest.raises(ReadError) as again:
            reader.next_message()
        assert (again.value.close_code, again.value.detail) == (
            first.value.close_code, first.value.detail)


def test_the_error_drops_buffered_data() -> None:
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(OP_BINARY, payload_of(50), fin=False) + client_frame(OP_BINARY, b"x"))
    reader.feed(client_frame(OP_BINARY, payload_of(70)))
    assert reader.buffered > 120
    with pytest.raises(ReadError):
        reader.next_message()
    assert reader.buffered == 0


# --- memory ---------------------------------------------------------------------------------

BIG = payload_of(1 << 20)
BIG_STREAMS = {
    "one feed": ([client_frame(OP_BINARY, BIG)], [0]),
    "three feeds": ([client_frame(OP_BINARY, BIG)], [1000, 600_000]),
    "four fragments": ([client_frame(OP_BINARY, BIG[:1], fin=False),
                        client_frame(OP_CONTINUATION, BIG[1:500_000], fin=False),
                        client_frame(OP_CONTINUATION, BIG[500_000:-1], fin=False),
                        client_frame(OP_CONTINUATION, BIG[-1:])], [3, 700_000]),
}


@pytest.mark.parametrize(("frames", "cuts"), BIG_STREAMS.values(), ids=BIG_STREAMS.keys())
def test_an_idle_reader_holds_no_earlier_data(frames: list[bytes], cuts: list[int]) -> None:
    reader = FrameReader(2 << 20)
    tracemalloc.start()
    try:
        stream = b"".join(frames)
        bounds = [0, *cuts, len(stream)]
        pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        del stream
        messages = []
        while pieces:
            reader.feed(pieces.pop(0))
            messages += read_all(reader)
        assert messages == [(OP_BINARY, BIG)]
        assert reader.buffered == held(reader) == 0
        del messages
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, wsreader.__file__), tracemalloc.Filter(True, __file__)])
    finally:
        tracemalloc.stop()
    traced = sum(stat.size for stat in snapshot.statistics("filename"))
    assert traced < 2048


def held(reader: FrameReader) -> int:
    """Bytes of fed data that the reader's buffers keep alive."""
    return (len(reader._chunk) + sum(map(len, reader._pending))
            + sum(map(len, reader._fragments)))


FRAME = client_frame(OP_BINARY, payload_of(4096))


@pytest.mark.parametrize("feeds", [
    [FRAME * 50 + FRAME[:10]],
    [FRAME[:100], FRAME[100:] + FRAME[:10]],
    [FRAME[:100], FRAME[100:2000], FRAME[2000:] + FRAME[:3]],
], ids=["one chunk", "after a join", "after a join of three"])
def test_a_waiting_reader_keeps_only_the_unparsed_tail(feeds: list[bytes]) -> None:
    reader = FrameReader(LIMIT)
    count = 0
    for data in feeds:
        reader.feed(data)
        count += len(read_all(reader))
    assert count == max(1, (len(b"".join(feeds)) - 1) // len(FRAME))
    assert reader.buffered == held(reader) == len(b"".join(feeds)) % len(FRAME)
    reader.feed(FRAME[reader.buffered:])
    assert read_all(reader) == [(OP_BINARY, payload_of(4096))]
    assert reader.buffered == held(reader) == 0


def test_a_frame_spanning_feeds_joins_only_its_own_bytes() -> None:
    frames = [client_frame(OP_BINARY, payload_of(4096)) for _ in range(300)]
    stream = b"".join(frames)
    reader = FrameReader(LIMIT)
    reader.feed(stream[:100])
    reader.feed(stream[100:])  # 1.2 MB, starting inside the first frame
    tracemalloc.start()
    try:
        count = 0
        while reader.next_message() is not None:
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 300
    assert peak < 64 * 1024  # a copy of the big chunk would be 1.2 MB


# --- parse_close ----------------------------------------------------------------------------

def test_parse_close_of_an_empty_payload() -> None:
    assert parse_close(b"") == (None, "")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1014, 3000, 4000, 4999])
def test_parse_close_valid_codes(code: int) -> None:
    assert parse_close(struct.pack(">H", code)) == (code, "")
    assert parse_close(struct.pack(">H", code) + "au revoir, ünd tschüss".encode()) == (
        code, "au revoir, ünd tschüss")


@pytest.mark.parametrize("payload", [
    b"\x03",
    *(struct.pack(">H", code) for code in
      [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535]),
    b"\x03\xe8\xff",
    b"\x03\xe8ok\xe2\x82",  # cut inside a character
    b"\x03\xe8\xed\xa0\x80",  # an encoded surrogate
    b"\x03\xe8\xc0\xaf",  # an overlong encoding
], ids=repr)
def test_parse_close_errors(payload: bytes) -> None:
    with pytest.raises(ReadError) as info:
        parse_close(payload)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR


# --- properties -----------------------------------------------------------------------------

masks = st.binary(min_size=4, max_size=4)
control_frames = st.tuples(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]),
                           st.binary(max_size=125), masks)


@st.composite
def message_streams(draw: st.DrawFn) -> tuple[bytes, list[Message]]:
    """Random messages, fragmented at random with control frames between the fragments;
    returns the encoded stream and the messages a reader must return, in order."""
    stream: list[bytes] = []
    expected: list[Message] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            op, payload, mask = draw(control_frames)
            stream.append(client_frame(op, payload, mask=mask))
            expected.append((op, payload))
            continue
        op = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        payload = draw(st.one_of(st.binary(max_size=300),
                                 st.sampled_from([125, 126, 127, 65535, 65536]).map(payload_of)))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        bounds = [0, *cuts, len(payload)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            last = i == len(bounds) - 2
            stream.append(client_frame(op if i == 0 else OP_CONTINUATION, payload[a:b],
                                       fin=last, mask=draw(masks)))
            if not last:
                for cop, cpayload, cmask in draw(st.lists(control_frames, max_size=2)):
                    stream.append(client_frame(cop, cpayload, mask=cmask))
                    expected.append((cop, cpayload))
        expected.append((op, payload))
    return b"".join(stream), expected


@pytest.mark.parametrize("impl", ["c", "python"])
@settings(max_examples=150, deadline=None)
@given(case=message_streams())
def test_reader_returns_the_encoded_messages(impl: str,
                                             case: tuple[bytes, list[Message]]) -> None:
    stream, expected = case
    with pytest.MonkeyPatch.context() as patch:
        if impl == "python":
            patch.setattr(wsreader, "unmask", wsreader._unmask_python)
        assert read_in_pieces(stream, []) == expected


@settings(max_examples=150, deadline=None)
@given(case=message_streams(), data=st.data())
def test_random_splits_give_the_same_messages_as_one_feed(
        case: tuple[bytes, list[Message]], data: st.DataObject) -> None:
    stream, _ = case
    whole = read_in_pieces(stream, [])
    short = len(stream) <= 2000
    cuts = data.draw(st.one_of(
        st.lists(st.integers(0, len(stream)), max_size=40),
        st.just(list(range(1, len(stream))) if short else list(range(1, len(stream), 97)))))
    takes = data.draw(st.lists(st.integers(0, 2), max_size=8))
    assert read_in_pieces(stream, cuts, takes=takes) == whole


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


def test_many_small_frames_in_odd_sized_feeds(unmask_impl: str) -> None:
    frames = [client_frame(OP_BINARY, payload_of(i % 300), mask=bytes((i % 256, 1, 2, 3)))
              for i in range(500)]
    reader = FrameReader(LIMIT)
    out: list[Message] = []
    for piece in chunks(b"".join(frames), 4093):
        reader.feed(piece)
        out += read_all(reader)
    assert out == [(OP_BINARY, payload_of(i % 300)) for i in range(500)]
    assert reader.buffered == 0


# --- fragment count cap ---------------------------------------------------------------------

MAX_FRAGMENTS = wsreader.MAX_FRAGMENTS


def fragmented(opcode: int, pieces: list[bytes], *, final: bool = True,
               between: bytes = b"") -> bytes:
    """One message in ``len(pieces)`` frames (the last one final unless ``final`` is False),
    with ``between`` (e.g. a ping) after each frame but the last."""
    frames = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        frames.append(client_frame(opcode if i == 0 else OP_CONTINUATION, piece,
                                   fin=last and final))
        if not last:
            frames.append(between)
    return b"".join(frames)


def one_byte_pieces(n: int) -> list[bytes]:
    return [bytes((i % 256,)) for i in range(n)]


def test_the_fragment_cap_is_large_enough_for_real_clients() -> None:
    assert MAX_FRAGMENTS >= 64


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
def test_a_message_in_exactly_max_fragments_frames_is_returned_whole(opcode: int) -> None:
    pieces = one_byte_pieces(MAX_FRAGMENTS)
    stream = fragmented(opcode, pieces)
    assert read_in_pieces(stream, []) == [(opcode, b"".join(pieces))]
    assert read_in_pieces(stream, list(range(0, len(stream), 997))) == [
        (opcode, b"".join(pieces))]


def test_a_message_of_max_fragments_empty_frames_is_returned_whole() -> None:
    assert read_in_pieces(fragmented(OP_BINARY, [b""] * MAX_FRAGMENTS), []) == [
        (OP_BINARY, b"")]


def test_control_frames_between_fragments_do_not_count_toward_the_cap() -> None:
    pieces = one_byte_pieces(MAX_FRAGMENTS)
    stream = fragmented(OP_BINARY, pieces, between=client_frame(OP_PING, b"p"))
    out = read_in_pieces(stream, [])
    assert out == [(OP_PING, b"p")] * (MAX_FRAGMENTS - 1) + [(OP_BINARY, b"".join(pieces))]


def test_the_fragment_count_starts_afresh_for_each_message() -> None:
    first = one_byte_pieces(MAX_FRAGMENTS)
    second = [b"x"] * MAX_FRAGMENTS
    stream = fragmented(OP_TEXT, first) + fragmented(OP_BINARY, second)
    assert read_in_pieces(stream, []) == [(OP_TEXT, b"".join(first)),
                                          (OP_BINARY, b"x" * MAX_FRAGMENTS)]


@pytest.mark.parametrize("payload", [b"", b"z"], ids=["empty", "one-byte"])
def test_one_frame_more_than_max_fragments_is_a_protocol_error(payload: bytes) -> None:
    stream = fragmented(OP_BINARY, [payload] * (MAX_FRAGMENTS + 1))
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(OP_PING, b"before") + stream + client_frame(OP_BINARY, b"after"))
    assert reader.next_message() == (OP_PING, b"before")
    with pytest.raises(ReadError) as info:
        reader.next_message()
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert str(MAX_FRAGMENTS) in info.value.detail
    assert reader.buffered == 0
    with pytest.raises(ReadError):  # sticky: the frame after it is never returned
        reader.next_message()


def test_the_cap_is_reached_before_the_final_frame_arrives() -> None:
    # MAX_FRAGMENTS - 1 non-final frames wait for more; the next non-final frame would make
    # the message longer than MAX_FRAGMENTS whatever follows, so it is refused at once.
    reader = FrameReader(LIMIT)
    reader.feed(fragmented(OP_TEXT, [b"a"] * (MAX_FRAGMENTS - 1), final=False))
    assert reader.next_message() is None
    assert reader.buffered == MAX_FRAGMENTS - 1  # the open message's payload
    reader.feed(client_frame(OP_CONTINUATION, b"a", fin=False))
    with pytest.raises(ReadError) as info:
        reader.next_message()
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR


def test_empty_fragments_fed_one_by_one_hold_nothing_until_the_cap() -> None:
    reader = FrameReader(LIMIT)
    frames = [client_frame(OP_BINARY, fin=False)] + [
        client_frame(OP_CONTINUATION, fin=False) for _ in range(MAX_FRAGMENTS - 2)]
    for frame in frames:
        reader.feed(frame)
        assert reader.next_message() is None
        assert reader.buffered == 0
    assert len(reader._fragments) == MAX_FRAGMENTS - 1
    reader.feed(client_frame(OP_CONTINUATION, fin=False))
    with pytest.raises(ReadError) as info:
        reader.next_message()
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert reader.buffered == held(reader) == 0


@pytest.mark.parametrize("count", [20_000, 200_000])
def test_many_empty_fragments_in_one_chunk_stay_small(count: int) -> None:
    # Without the cap, 20,000 empty fragments would cost a 170 KB list (b"" is shared), so
    # the bound is well under that; with it the reader peaks near 10 KB.
    stream = client_frame(OP_BINARY, fin=False) + client_frame(OP_CONTINUATION, fin=False) * count
    reader = FrameReader(LIMIT)
    tracemalloc.start()
    try:
        reader.feed(stream)
        with pytest.raises(ReadError) as info:
            reader.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert peak < 64 * 1024  # one list entry per fragment up to the cap, no more
    assert reader.buffered == held(reader) == 0
    reader.feed(stream)  # a finished reader takes nothing more
    assert reader.buffered == 0
