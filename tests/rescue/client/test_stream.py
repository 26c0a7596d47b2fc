"""Tests for rescue.client.stream: the sealed, ordered, resumable stream of the e2e spec (3-5)."""

from __future__ import annotations

import math
import os
import random
import struct
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rescue.client.errors import ChannelError, GapError, IntegrityError, ReplayError
from rescue.client.stream import (
    MAX_CHUNK,
    Delivery,
    Inbox,
    Outbox,
    Resend,
    ResendRequest,
    encode_resend,
    encode_resend_request,
    open_control,
    parse_control_body,
)
from rescue.frames import MAX_SEQ, Kind, decode_frame, encode_frame


class AesGcmCipher:
    """A real test cipher: AES-256-GCM, nonce ``u8 kind || 3 zero || u64 seq``, associated
    data = the frame's header (whose length counts ``extra_ad``, the payload's cleartext
    prefix, and the sealed bytes) followed by ``extra_ad``."""

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = AESGCM(key if key is not None else os.urandom(32))

    @staticmethod
    def _nonce(kind: int, seq: int) -> bytes:
        return struct.pack(">B3xQ", kind, seq)

    @staticmethod
    def _header(kind: int, seq: int, length: int) -> bytes:
        if length > 0xFFFF:
            raise ValueError(f"payload of {length} bytes does not fit a frame")
        return struct.pack(">BBHI", 1, kind, length, seq)

    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes:
        ad = self._header(kind, seq, len(extra_ad) + len(plaintext) + 16) + extra_ad
        return self._aead.encrypt(self._nonce(kind, seq), plaintext, ad)

    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
        ad = self._header(kind, seq, len(extra_ad) + len(payload)) + extra_ad
        try:
            return self._aead.decrypt(self._nonce(kind, seq), payload, ad)
        except InvalidTag:
            raise IntegrityError("frame failed authentication") from None


class PrefixCipher:
    """Like a participant's slotted cipher: one authenticated cleartext byte in front."""

    def __init__(self, inner: AesGcmCipher, prefix: int) -> None:
        self.inner, self.prefix = inner, bytes([prefix])

    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes:
        return self.prefix + self.inner.seal(kind, seq, plaintext, extra_ad + self.prefix)

    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
        if payload[:1] != self.prefix:
            raise IntegrityError("wrong prefix")
        return self.inner.open(kind, seq, payload[1:], extra_ad + self.prefix)


def seal_ack(cipher: AesGcmCipher, seq: int) -> bytes:
    """A receiver's ack frame: the tag of an empty plaintext (as the channel seals it)."""
    return encode_frame(Kind.ACK, seq, cipher.seal(Kind.ACK, seq, b""))


def feed(inbox: Inbox, wire: bytes, now: float = 0.0) -> Delivery:
    """Hand one wire frame to ``inbox`` the way a channel dispatches by kind."""
    frame = decode_frame(wire)
    if frame.kind == Kind.CONTROL:
        return inbox.on_control(frame.seq, frame.payload)
    return inbox.on_frame(frame.kind, frame.seq, frame.payload, now)


def flip(wire: bytes, index: int, bit: int = 0) -> bytes:
    """``wire`` with one bit flipped."""
    changed = bytearray(wire)
    changed[index] ^= 1 << bit
    return bytes(changed)


def stream(**inbox_options: Any) -> tuple[AesGcmCipher, Outbox, Inbox]:
    """A fresh key and the two ends of one stream under it."""
    cipher = AesGcmCipher()
    return cipher, Outbox(cipher), Inbox(cipher, **inbox_options)


def send(outbox: Outbox, inbox: Inbox, *messages: bytes, now: float = 0.0) -> list[bytes]:
    """Seal ``messages`` and deliver them all in order; return what the inbox delivered."""
    out: list[bytes] = []
    for message in messages:
        for wire in outbox.seal_message(message):
            out.extend(feed(inbox, wire, now).messages)
    return out


# --- control bodies -------------------------------------------------------------------------

def test_control_bodies_round_trip() -> None:
    assert encode_resend(3, 9) == b"\x01" + (3).to_bytes(4, "big") + (9).to_bytes(4, "big")
    assert parse_control_body(encode_resend(3, 9)) == Resend(3, 9)
    assert encode_resend_request(7) == b"\x02\x00\x00\x00\x07"
    assert parse_control_body(encode_resend_request(7)) == ResendRequest(7)
    assert encode_resend_request(7, "p-1") == b"\x02\x00\x00\x00\x07\x03p-1"
    assert parse_control_body(encode_resend_request(7, "p-1")) == ResendRequest(7, "p-1")


@pytest.mark.parametrize("body", [
    b"", b"\x01", b"\x03\x00\x00\x00\x01", encode_resend(2, 5)[:-1], encode_resend(2, 5) + b"x",
    b"\x01" + struct.pack(">II", 5, 2), b"\x01" + struct.pack(">II", 0, 2),
    b"\x02\x00\x00\x00\x00", b"\x02\x00\x00\x01", b"\x02\x00\x00\x00\x01\x05ab",
    b"\x02\x00\x00\x00\x01\x02\xff\xfe",
])
def test_malformed_control_body_is_an_integrity_error(body: bytes) -> None:
    with pytest.raises(IntegrityError, match="malformed"):
        parse_control_body(body)


def test_encoders_refuse_out_of_range_values() -> None:
    for bad in ((0, 1), (5, 4), (1, MAX_SEQ + 1)):
        with pytest.raises(ValueError):
            encode_resend(*bad)
    with pytest.raises(ValueError):
        encode_resend_request(0)
    with pytest.raises(ValueError):
        encode_resend_request(1, "x" * 256)


# --- sealing, fragmentation, reassembly -------------------------------------------------------

def test_one_message_is_one_sealed_data_frame() -> None:
    cipher, outbox, inbox = stream()
    [wire] = outbox.seal_message(b"hello")
    frame = decode_frame(wire)
    assert (frame.kind, frame.seq, len(frame.payload)) == (Kind.DATA, 1, 1 + 5 + 16)
    assert cipher.open(Kind.DATA, 1, frame.payload) == b"\x00hello"
    assert b"hello" not in wire
    assert outbox.next_seq == 2
    assert (outbox.buffered_frames, outbox.buffered_bytes) == (1, len(wire))
    assert feed(inbox, wire) == Delivery(messages=[b"hello"])
    assert inbox.expected == 2 and inbox.last_delivered() == 1


@pytest.mark.parametrize(("size", "frames"), [
    (0, 1), (MAX_CHUNK, 1), (MAX_CHUNK + 1, 2), (2 * MAX_CHUNK + 1, 3),
])
def test_large_messages_are_fragmented_with_the_more_flag(size: int, frames: int) -> None:
    cipher, outbox, inbox = stream()
    message = random.Random(size).randbytes(size)
    wires = outbox.seal_message(message)
    assert len(wires) == frames
    flags = [cipher.open(Kind.DATA, i + 1, decode_frame(w).payload)[0] for i, w in enumerate(wires)]
    assert flags == [1] * (frames - 1) + [0]
    assert all(len(w) <= 8 + 0xFFFF for w in wires)
    deliveries = [feed(inbox, w) for w in wires]
    assert [d.messages for d in deliveries] == [[]] * (frames - 1) + [[message]]


def test_message_over_max_message_bytes_is_an_integrity_error() -> None:
    _, outbox, inbox = stream(max_message_bytes=MAX_CHUNK + 10)
    wires = outbox.seal_message(bytes(MAX_CHUNK + 11))
    feed(inbox, wires[0])
    with pytest.raises(IntegrityError, match="max_message_bytes"):
        feed(inbox, wires[1])


def test_unknown_flag_bits_are_refused() -> None:
    cipher, _, inbox = stream()
    wire = encode_frame(Kind.DATA, 1, cipher.seal(Kind.DATA, 1, b"\x02x"))
    with pytest.raises(IntegrityError, match="flags"):
        feed(inbox, wire)


def test_close_ends_the_stream() -> None:
    cipher, outbox, inbox = stream()
    assert send(outbox, inbox, b"a") == [b"a"]
    close = outbox.seal_close("done ✓")
    assert decode_frame(close).kind == Kind.CLOSE
    assert outbox.buffered_frames == 2
    assert feed(inbox, close) == Delivery(closed="done ✓")
    assert inbox.closed == "done ✓"
    with pytest.raises(ChannelError, match="closed"):
        outbox.seal_message(b"late")
    forged_late = encode_frame(Kind.DATA, 3, cipher.seal(Kind.DATA, 3, b"\x00late"))
    with pytest.raises(IntegrityError, match="after the stream was closed"):
        feed(inbox, forged_late)


def test_close_inside_a_fragmented_message_is_refused() -> None:
    cipher, _, inbox = stream()
    feed(inbox, encode_frame(Kind.DATA, 1, cipher.seal(Kind.DATA, 1, b"\x01part")))
    with pytest.raises(IntegrityError, match="middle"):
        feed(inbox, encode_frame(Kind.CLOSE, 2, cipher.seal(Kind.CLOSE, 2, b"bye")))


def test_seq_exhaustion_fails_the_channel_without_sealing() -> None:
    _, outbox, _ = stream()
    outbox.next_seq = MAX_SEQ - 2
    with pytest.raises(ChannelError, match="exhausted") as excinfo:
        outbox.seal_message(bytes(3 * MAX_CHUNK))
    assert not isinstance(excinfo.value, IntegrityError)
    assert (outbox.next_seq, outbox.buffered_frames) == (MAX_SEQ - 2, 0)
    assert len(outbox.seal_message(bytes(MAX_CHUNK + 1))) == 2
    assert outbox.next_seq == MAX_SEQ
    with pytest.raises(ChannelError, match="exhausted"):
        outbox.seal_message(b"")
    with pytest.raises(ChannelError, match="exhausted"):
        outbox.seal_close("bye")


# --- docs/protocol.md section 10.7 test vectors and cleartext prefixes ---------------------------

GROUP_KEY = bytes.fromhex("404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f")
K_P2H = bytes.fromhex("aa407480198d4a3e4fda1fe3d0df9e5c313dbf701be903cca1e76113f8f28e76")


def test_frames_match_the_published_vectors() -> None:
    host = Outbox(AesGcmCipher(GROUP_KEY))
    assert host.seal_message(b"hello") == [bytes.fromhex(
        "010100160000000160553d7fb80544f5b17148cf7093d99dc396adaed919")]
    assert decode_frame(host.seal_control(encode_resend(1, 1))).payload == bytes.fromhex(
        "10b2ae733193a6e44111004c0bca078739ad5e3f90a74a0c0256")
    participant = Outbox(PrefixCipher(AesGcmCipher(K_P2H), 7), max_chunk=MAX_CHUNK - 1)
    assert decode_frame(participant.seal_message(b"hello")[0]).payload == bytes.fromhex(
        "07baae546dead3f18dedb725f341f63faf384e04660bfa")


def test_a_prefixing_cipher_needs_a_smaller_chunk() -> None:
    cipher = PrefixCipher(AesGcmCipher(), 7)
    outbox = Outbox(cipher, max_chunk=MAX_CHUNK - 1)
    inbox = Inbox(cipher)
    [full] = outbox.seal_message(bytes(MAX_CHUNK - 1))
    assert len(decode_frame(full).payload) == 0xFFFF
    message = random.Random(1).randbytes(2 * MAX_CHUNK)
    wires = outbox.seal_message(message)
    assert len(wires) == 3
    assert [m for w in [full, *wires] for m in feed(inbox, w).messages] == [
        bytes(MAX_CHUNK - 1), message]
    control = outbox.seal_control(encode_resend(1, 1))
    assert decode_frame(control).payload[:2] == b"\x10\x07"
    feed(inbox, control)  # a participant's sealed control opens with its slotted cipher
    with pytest.raises(ValueError):  # the default chunk does not leave room for the prefix
        Outbox(cipher).seal_message(bytes(MAX_CHUNK))
    for bad in (0, MAX_CHUNK + 1):
        with pytest.raises(ValueError):
            Outbox(cipher, max_chunk=bad)


def test_close_reason_must_fit_one_frame() -> None:
    _, outbox, inbox = stream()
    with pytest.raises(ValueError):
        outbox.seal_close("x" * (MAX_CHUNK + 2))
    assert outbox.next_seq == 1
    close = outbox.seal_close("x" * (MAX_CHUNK + 1))
    assert len(close) == 8 + 0xFFFF
    assert feed(inbox, close).closed == "x" * (MAX_CHUNK + 1)


# --- tampering ---------------------------------------------------------------------------------

@settings(deadline=None, max_examples=200)
@given(data=st.data())
def test_any_bit_flip_in_a_payload_is_an_integrity_error(data: st.DataObject) -> None:
    _, outbox, inbox = stream()
    [wire] = outbox.seal_message(data.draw(st.binary(max_size=64)))
    index = data.draw(st.integers(8, len(wire) - 1))
    with pytest.raises(IntegrityError, match="failed authentication") as excinfo:
        feed(inbox, flip(wire, index, data.draw(st.integers(0, 7))))
    assert type(excinfo.value) is IntegrityError
    assert inbox.expected == 1


def test_a_header_changed_to_another_seq_fails_authentication() -> None:
    _, outbox, inbox = stream()
    first, second = outbox.seal_message(b"a") + outbox.seal_message(b"b")
    moved = first[:4] + (2).to_bytes(4, "big") + first[8:]
    feed(inbox, first)
    with pytest.raises(IntegrityError, match="failed authentication"):
        feed(inbox, moved)
    assert feed(inbox, second).messages == [b"b"]


def test_a_frame_of_another_key_fails_authentication() -> None:
    _, outbox, _ = stream()
    stranger = Inbox(AesGcmCipher())
    with pytest.raises(IntegrityError, match="data frame seq 1 failed authentication"):
        feed(stranger, outbox.seal_message(b"x")[0])


def test_dropping_a_frame_mid_stream_is_a_gap_error() -> None:
    _, outbox, inbox = stream()
    wires = [w for m in (b"1", b"2", b"3", b"4") for w in outbox.seal_message(m)]
    feed(inbox, wires[0])
    with pytest.raises(GapError, match="frames lost between 2 and 3"):
        feed(inbox, wires[3])


def test_replay_outside_a_window_is_a_replay_error() -> None:
    _, outbox, inbox = stream()
    wires = outbox.seal_message(b"1") + outbox.seal_message(b"2")
    feed(inbox, wires[0])
    feed(inbox, wires[1])
    with pytest.raises(ReplayError, match="replayed frame seq 1"):
        feed(inbox, wires[0])


def test_replay_inside_a_window_must_be_strictly_increasing() -> None:
    _, outbox, inbox = stream()
    wires = [w for m in (b"1", b"2", b"3") for w in outbox.seal_message(m)]
    assert [m for w in wires for m in feed(inbox, w).messages] == [b"1", b"2", b"3"]
    control, *resent = outbox.resend()
    assert feed(inbox, control) == Delivery()
    assert feed(inbox, resent[1]) == Delivery()  # seq 2: skipping is fine
    with pytest.raises(ReplayError, match="replayed frame seq 1"):
        feed(inbox, resent[0])  # seq 1 after seq 2
    with pytest.raises(ReplayError, match="replayed frame seq 2"):
        feed(inbox, resent[1])  # the same duplicate twice


def test_duplicates_past_the_window_end_are_replays() -> None:
    _, outbox, inbox = stream()
    send(outbox, inbox, b"1", b"2", b"3")
    old = outbox.resend()
    feed(inbox, outbox.seal_control(encode_resend(1, 1)))
    feed(inbox, old[1])
    with pytest.raises(ReplayError, match="replayed frame seq 2"):
        feed(inbox, old[2])


def test_a_new_frame_ends_the_window() -> None:
    _, outbox, inbox = stream()
    send(outbox, inbox, b"1", b"2")
    control, first, second = outbox.resend()
    feed(inbox, control)
    feed(inbox, first)
    assert send(outbox, inbox, b"3") == [b"3"]
    with pytest.raises(ReplayError):
        feed(inbox, second)


def test_a_tampered_duplicate_inside_the_window_fails_authentication() -> None:
    _, outbox, inbox = stream()
    send(outbox, inbox, b"1")
    control, resent = outbox.resend()
    feed(inbox, control)
    with pytest.raises(IntegrityError, match="failed authentication"):
        feed(inbox, flip(resent, len(resent) - 1))


def test_sealed_control_tampering_replay_and_a_resend_past_expected() -> None:
    _, outbox, inbox = stream()
    control = outbox.seal_control(encode_resend(1, 1))
    with pytest.raises(IntegrityError, match="control frame seq 1 failed authentication"):
        feed(inbox, flip(control, 12))
    with pytest.raises(IntegrityError, match="not a sealed control"):
        inbox.on_control(1, b"\x01" + decode_frame(control).payload[1:])
    feed(inbox, control)
    with pytest.raises(ReplayError, match="replayed control frame seq 1"):
        feed(inbox, control)
    with pytest.raises(GapError, match="frames lost between 1 and 2"):
        feed(inbox, outbox.seal_control(encode_resend(3, 4)))


def test_a_resend_request_control_is_reported_to_the_caller() -> None:
    _, outbox, inbox = stream()
    assert feed(inbox, outbox.seal_control(encode_resend_request(4))) == Delivery(
        resend_requested_from=4)


def test_seal_control_with_another_cipher_shares_the_control_seq() -> None:
    stream_key, pairwise = AesGcmCipher(), AesGcmCipher()
    outbox = Outbox(stream_key)
    first = decode_frame(outbox.seal_control(b"\x02\x00\x00\x00\x01\x01p", pairwise))
    second = decode_frame(outbox.seal_control(encode_resend(1, 1)))
    assert (first.kind, first.seq, second.seq) == (Kind.CONTROL, 1, 2)
    assert first.payload[0] == 0x10
    assert open_control(pairwise, 1, first.payload) == b"\x02\x00\x00\x00\x01\x01p"
    with pytest.raises(IntegrityError):
        open_control(stream_key, 1, first.payload)
    with pytest.raises(IntegrityError):  # the 0x10 type byte is authenticated too
        pairwise.open(Kind.CONTROL, 1, first.payload[1:])


def test_forged_ack_for_an_unsent_seq_is_an_integrity_error() -> None:
    _, outbox, _ = stream()
    outbox.add_receiver("host")
    outbox.seal_message(b"x")
    with pytest.raises(IntegrityError, match="never sent"):
        outbox.on_ack("host", 2)
    assert outbox.buffered_frames == 1


# --- recovering -------------------------------------------------------------------------------

def test_gaps_while_recovering_are_dropped_with_one_resend_request() -> None:
    cipher, outbox, inbox = stream()
    wires = [w for m in (b"1", b"2", b"3", b"4", b"5") for w in outbox.seal_message(m)]
    feed(inbox, wires[0])
    inbox.start_recovering()
    assert inbox.recovering
    first = feed(inbox, wires[2])
    assert first.messages == [] and first.resend_request == encode_resend_request(2)
    assert feed(inbox, wires[3]) == Delivery()  # at most one request per recovering period
    assert inbox.expected == 2
    control, *resent = outbox.resend(2)
    announced = decode_frame(control)
    assert parse_control_body(open_control(cipher, announced.seq, announced.payload)) == Resend(
        2, 5)
    assert [m for w in [control, *resent] for m in feed(inbox, w).messages] == [
        b"2", b"3", b"4", b"5"]
    assert not inbox.recovering
    outbox.seal_message(b"6")
    with pytest.raises(GapError, match="frames lost between 6 and 6"):
        feed(inbox, outbox.seal_message(b"7")[0])


def test_a_new_recovering_period_allows_a_new_request() -> None:
    _, outbox, inbox = stream()
    wires = [w for m in (b"1", b"2", b"3") for w in outbox.seal_message(m)]
    inbox.start_recovering()
    assert feed(inbox, wires[1]).resend_request == encode_resend_request(1)
    inbox.start_recovering()
    assert feed(inbox, wires[2]).resend_request == encode_resend_request(1)


def test_frames_before_start_seq_are_dropped_silently() -> None:
    cipher = AesGcmCipher()
    outbox = Outbox(cipher)
    early = [w for m in (b"1", b"2") for w in outbox.seal_message(m)]
    inbox = Inbox(cipher, start_seq=outbox.next_seq)
    assert [feed(inbox, w) for w in early] == [Delivery(), Delivery()]
    assert feed(inbox, flip(early[0], 9)) == Delivery()  # not for it: not even opened
    assert send(outbox, inbox, b"3") == [b"3"]
    control, *resent = outbox.resend()
    assert [feed(inbox, w) for w in [control, *resent]] == [Delivery()] * 4


def test_on_frame_takes_only_data_and_close() -> None:
    _, _, inbox = stream()
    with pytest.raises(ValueError):
        inbox.on_frame(Kind.ACK, 1, bytes(16), 0.0)


# --- replay buffer, resend and backpressure ----------------------------------------------------

def test_resend_bounds() -> None:
    _, outbox, _ = stream()
    outbox.add_receiver("host")
    assert outbox.resend() == []
    wires = [w for m in (b"1", b"2", b"3") for w in outbox.seal_message(m)]
    assert outbox.resend()[1:] == wires
    assert outbox.resend(3)[1:] == wires[2:]
    assert outbox.resend(4) == []
    with pytest.raises(IntegrityError, match="never sent"):
        outbox.resend(5)
    outbox.on_ack("host", 2)
    assert outbox.resend()[1:] == wires[2:]
    with pytest.raises(IntegrityError, match="already acknowledged"):
        outbox.resend(2)


def test_backpressure_by_frames_and_bytes() -> None:
    cipher = AesGcmCipher()
    by_frames = Outbox(cipher, max_unacked_frames=3)
    by_frames.add_receiver("host")
    assert by_frames.room_for(10 * MAX_CHUNK)  # an empty buffer always has room
    for message in (b"1", b"2", b"3"):
        assert by_frames.room_for(1)
        by_frames.seal_message(message)
    assert not by_frames.room_for(0)
    by_frames.on_ack("host", 1)
    assert by_frames.room_for(1) and not by_frames.room_for(MAX_CHUNK + 1)

    by_bytes = Outbox(cipher, max_unacked_bytes=1000)
    by_bytes.add_receiver("host")
    by_bytes.seal_message(bytes(500))
    assert by_bytes.buffered_bytes == 8 + 1 + 500 + 16
    assert by_bytes.room_for(1000 - 525 - 25)
    assert not by_bytes.room_for(1000 - 525 - 24)
    by_bytes.on_ack("host", 1)
    assert by_bytes.buffered_bytes == 0 and by_bytes.room_for(10**6)


def test_host_releases_the_minimum_over_receivers() -> None:
    _, outbox, _ = stream()
    for message in (b"1", b"2", b"3", b"4"):
        outbox.seal_message(message)
    outbox.on_ack("nobody", 3)
    assert outbox.buffered_frames == 4  # no receivers: nothing is released
    outbox.add_receiver("a", start_seq=1)
    outbox.add_receiver("b", start_seq=1)
    outbox.on_ack("a", 3)
    assert outbox.buffered_frames == 4
    outbox.on_ack("b", 2)
    assert outbox.buffered_frames == 2
    outbox.on_ack("b", 1)  # lower: ignored
    outbox.add_receiver("b", start_seq=1)  # already known: keeps its position
    assert outbox.buffered_frames == 2
    outbox.add_receiver("c")  # starts at next_seq: holds nothing back
    outbox.remove_receiver("b")
    assert outbox.buffered_frames == 1
    outbox.on_ack("a", 4)
    outbox.on_ack("c", 4)
    assert (outbox.buffered_frames, outbox.buffered_bytes) == (0, 0)
    with pytest.raises(ValueError):
        outbox.add_receiver("d", start_seq=outbox.next_seq + 1)


def test_ack_positions_and_the_oldest_buffered_seq() -> None:
    _, outbox, _ = stream()
    assert outbox.oldest_seq() == 1
    for message in (b"1", b"2", b"3"):
        outbox.seal_message(message)
    outbox.add_receiver("a", start_seq=2)
    outbox.add_receiver("b")
    assert (outbox.acked_by("a"), outbox.acked_by("b")) == (1, 3)
    assert outbox.oldest_seq() == 2
    outbox.on_ack("a", 2)
    assert (outbox.acked_by("a"), outbox.oldest_seq()) == (2, 3)
    outbox.on_ack("a", 3)
    assert outbox.oldest_seq() == outbox.next_seq == 4
    with pytest.raises(KeyError):
        outbox.acked_by("c")


def test_take_control_seq_shares_the_control_counter() -> None:
    outbox = Outbox(AesGcmCipher())
    assert outbox.take_control_seq() == 1
    control = outbox.seal_control(encode_resend(1, 1))
    assert decode_frame(control).seq == 2
    assert outbox.take_control_seq() == 3
    outbox._next_control_seq = MAX_SEQ - 1
    assert outbox.take_control_seq() == MAX_SEQ - 1
    with pytest.raises(ChannelError, match="exhausted"):
        outbox.seal_control(b"\x02\x00\x00\x00\x01")


# --- ack policy --------------------------------------------------------------------------------

def test_ack_by_frame_count() -> None:
    _, outbox, inbox = stream(ack_every_frames=3, ack_delay_s=10.0)
    assert inbox.ack_due(0.0) is None and inbox.ack_deadline() is None
    send(outbox, inbox, b"1", b"2")
    assert inbox.ack_due(0.0) is None
    send(outbox, inbox, b"3")
    assert inbox.ack_due(0.0) == 3 and inbox.ack_deadline() == -math.inf
    inbox.ack_sent(3, 0.0)
    assert inbox.ack_due(100.0) is None and inbox.ack_deadline() is None


def test_ack_by_bytes() -> None:
    _, outbox, inbox = stream(ack_every_bytes=100, ack_delay_s=10.0)
    send(outbox, inbox, bytes(40))
    assert inbox.ack_due(0.0) is None
    send(outbox, inbox, bytes(40))
    assert inbox.ack_due(0.0) == 2


def test_ack_by_delay_after_the_oldest_unacked_delivery() -> None:
    _, outbox, inbox = stream(ack_delay_s=0.05)
    send(outbox, inbox, b"1", now=1.0)
    send(outbox, inbox, b"2", now=1.04)
    assert inbox.ack_deadline() == pytest.approx(1.05)
    assert inbox.ack_due(1.049) is None
    assert inbox.ack_due(1.05) == 2
    inbox.ack_sent(1, 1.05)  # a partial ack leaves the rest pending
    assert inbox.ack_due(1.05) == 2
    inbox.ack_sent(2, 1.05)
    assert inbox.ack_due(5.0) is None
    with pytest.raises(ValueError):
        inbox.ack_sent(3, 5.0)


def test_ack_right_after_a_resend_window_completes_and_after_reconnect() -> None:
    _, outbox, inbox = stream(ack_delay_s=10.0)
    send(outbox, inbox, b"1", b"2")
    inbox.ack_sent(2, 0.0)
    control, first, second = outbox.resend()
    feed(inbox, control)
    feed(inbox, first)
    assert inbox.ack_due(0.0) is None
    feed(inbox, second)
    assert inbox.ack_due(0.0) == 2  # the sender did not see our ack: say it again
    inbox.ack_sent(2, 0.0)
    inbox.start_recovering()
    assert inbox.ack_due(0.0) == 2


def test_close_is_acked_at_once() -> None:
    _, outbox, inbox = stream(ack_delay_s=10.0)
    feed(inbox, outbox.seal_close("bye"))
    assert inbox.ack_due(0.0) == 1


def test_nothing_to_ack_before_the_first_delivery() -> None:
    _, _, inbox = stream()
    inbox.start_recovering()
    assert inbox.ack_due(1e9) is None and inbox.ack_deadline() is None


# --- the whole loop through a lossy relay --------------------------------------------------------

def message_strategy() -> st.SearchStrategy[bytes]:
    """Mostly small messages, sometimes ones that need two or three frames."""
    big = st.builds(lambda n, seed: random.Random(seed).randbytes(n),
                    st.integers(MAX_CHUNK - 1, 2 * MAX_CHUNK + 1), st.integers(0, 2**32))
    return st.one_of(st.binary(max_size=40), big)


class RelayMachine(RuleBasedStateMachine):
    """Sender → relay → receiver. The relay loses everything in flight while the receiver is
    away; after it returns (recovering) frames the sender sends before it hears of the return
    arrive past a gap, and the relay may lose the next data frame. Duplicates come only from
    announced resends. The receiver's acks and resend requests travel back sealed."""

    def __init__(self) -> None:
        super().__init__()
        forward, backward = AesGcmCipher(), AesGcmCipher()
        self.outbox = Outbox(forward, max_unacked_frames=12, max_unacked_bytes=300_000)
        self.outbox.add_receiver("host")
        self.inbox = Inbox(forward, ack_every_frames=2, ack_delay_s=0.05)
        self.backward = backward
        self.receiver_controls = Outbox(backward)  # the receiver's own control seq
        self.to_receiver: list[bytes] = []
        self.to_sender: list[bytes] = []
        self.connected = True
        self.resume_pending = False  # the sender has not yet heard that the receiver is back
        self.steps_since_settle = 0
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.now = 0.0

    def _ack_if_due(self) -> None:
        seq = self.inbox.ack_due(self.now)
        if seq is not None:
            self.inbox.ack_sent(seq, self.now)
            if self.connected:
                self.to_sender.append(seal_ack(self.backward, seq))

    def _receive_one(self) -> None:
        delivery = feed(self.inbox, self.to_receiver.pop(0), self.now)
        self.received.extend(delivery.messages)
        if delivery.resend_request is not None and self.connected:
            self.to_sender.append(self.receiver_controls.seal_control(delivery.resend_request))
        self._ack_if_due()

    @rule(messages=st.lists(message_strategy(), min_size=1, max_size=4))
    def send(self, messages: list[bytes]) -> None:
        self.steps_since_settle += 1
        for message in messages:
            if not self.outbox.room_for(len(message)):
                return
            frames = self.outbox.seal_message(message)
            self.sent.append(message)
            if self.connected:
                self.to_receiver.extend(frames)

    @rule(count=st.integers(1, 8))
    def deliver(self, count: int) -> None:
        for _ in range(min(count, len(self.to_receiver))):
            self._receive_one()

    @precondition(lambda self: self.inbox.recovering and self.to_receiver)
    @rule()
    def lose_next_frame_while_recovering(self) -> None:
        if decode_frame(self.to_receiver[0]).kind != Kind.CONTROL:
            self.to_receiver.pop(0)

    @rule()
    def deliver_to_sender(self) -> None:
        while self.to_sender:
            frame = decode_frame(self.to_sender.pop(0))
            if frame.kind == Kind.ACK:
                self.backward.open(Kind.ACK, frame.seq, frame.payload)
                self.outbox.on_ack("host", frame.seq)
                continue
            request = parse_control_body(open_control(self.backward, frame.seq, frame.payload))
            assert isinstance(request, ResendRequest)
            self.to_receiver.extend(self.outbox.resend(request.from_seq))

    @rule(seconds=st.floats(0.0, 0.1))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._ack_if_due()

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False
        self.to_receiver.clear()
        self.to_sender.clear()
        self.inbox.start_recovering()

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connected = True
        self.resume_pending = True
        self.inbox.start_recovering()
        self._ack_if_due()

    @precondition(lambda self: self.connected)
    @rule(lost=st.lists(message_strategy(), min_size=1, max_size=3),
          after=st.lists(message_strategy(), min_size=1, max_size=3))
    def receiver_away(self, lost: list[bytes], after: list[bytes]) -> None:
        """The receiver drops off, the sender sends, the receiver comes back and more frames
        reach it before the sender hears of the return."""
        self.disconnect()
        self.send(lost)
        self.reconnect()
        self.send(after)

    @precondition(lambda self: self.resume_pending)
    @rule()
    def sender_resumes(self) -> None:
        self.resume_pending = False
        self.to_receiver.extend(self.outbox.resend())

    @precondition(lambda self: self.connected)
    @rule(recovering=st.booleans())
    def announced_duplicates(self, recovering: bool) -> None:
        if recovering:
            self.inbox.start_recovering()
        self.to_receiver.extend(self.outbox.resend())

    @precondition(lambda self: self.steps_since_settle >= 8)
    @rule()
    def settle(self) -> None:
        """Resume once more and let everything through: all sent messages arrive, all acked."""
        self.steps_since_settle = 0
        if self.connected:
            self.disconnect()
        self.reconnect()
        self.sender_resumes()
        for _ in range(10_000):
            if not self.to_receiver and not self.to_sender:
                break
            if self.to_receiver:
                self._receive_one()
            self.deliver_to_sender()
        self.tick(1.0)
        self.deliver_to_sender()
        assert self.received == self.sent
        assert self.outbox.buffered_frames == 0

    @invariant()
    def delivered_a_prefix_in_order(self) -> None:
        assert self.received == self.sent[: len(self.received)]

    def teardown(self) -> None:
        self.settle()
        self.to_receiver.append(self.outbox.seal_close("done"))
        assert feed(self.inbox, self.to_receiver.pop()).closed == "done"


RelayMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                          deadline=None)
test_relay_delivers_exactly_what_was_sent = RelayMachine.TestCase
