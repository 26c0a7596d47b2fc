"""Tests for rescue.client.slotted: the authenticated one-byte participant slot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.client.e2e import TAG_SIZE, FrameCipher, Suite
from rescue.client.errors import IntegrityError
from rescue.client.slotted import TARGETED_CONTROL, SlotCipher, seal_targeted, split_slot
from rescue.client.stream import SEALED_CONTROL, Outbox
from rescue.frames import Kind, decode_frame

KEY = bytes(range(32))
SLOTS = st.integers(0, 255)


@pytest.mark.parametrize("suite", list(Suite))
@settings(deadline=None, max_examples=50)
@given(slot=SLOTS, seq=st.integers(1, 2**32 - 2), data=st.binary(max_size=64),
       kind=st.sampled_from([Kind.DATA, Kind.CLOSE, Kind.ACK]))
def test_round_trip_puts_the_slot_in_front(suite: Suite, slot: int, seq: int, data: bytes,
                                           kind: Kind) -> None:
    cipher = SlotCipher(FrameCipher(suite, KEY), slot)
    payload = cipher.seal(kind, seq, data)
    assert payload[0] == slot and len(payload) == 1 + len(data) + TAG_SIZE
    assert split_slot(payload) == (slot, payload[1:])
    assert cipher.open(kind, seq, payload) == data
    # the same bytes are what the host's own FrameCipher opens with the slot as extra AD
    assert FrameCipher(suite, KEY).open(kind, seq, payload[1:], bytes((slot,))) == data


def test_control_frames_authenticate_their_cleartext_prefix_and_slot() -> None:
    cipher = SlotCipher(FrameCipher(Suite.AES_256_GCM, KEY), 9)
    prefix = bytes((SEALED_CONTROL,))
    payload = cipher.seal(Kind.CONTROL, 4, b"body", prefix)
    assert cipher.open(Kind.CONTROL, 4, payload, prefix) == b"body"
    with pytest.raises(IntegrityError):
        cipher.open(Kind.CONTROL, 4, payload)  # without the 0x10 prefix in the AD


def test_a_payload_carrying_another_slot_is_refused_before_opening() -> None:
    inner = FrameCipher(Suite.AES_256_GCM, KEY)
    payload = SlotCipher(inner, 3).seal(Kind.DATA, 1, b"x")
    with pytest.raises(IntegrityError, match="slot 3 reached slot 4"):
        SlotCipher(inner, 4).open(Kind.DATA, 1, payload)


def test_the_slot_is_in_the_associated_data() -> None:
    # Same key at both slots, slot byte rewritten consistently: only the AD can notice.
    inner = FrameCipher(Suite.CHACHA20_POLY1305, KEY)
    payload = SlotCipher(inner, 3).seal(Kind.DATA, 1, b"x")
    moved = bytes((4,)) + payload[1:]
    with pytest.raises(IntegrityError):
        SlotCipher(inner, 4).open(Kind.DATA, 1, moved)
    with pytest.raises(IntegrityError):
        inner.open(Kind.DATA, 1, payload[1:])  # the slot dropped from the AD


def test_split_slot_refuses_an_empty_payload_and_slots_are_one_byte() -> None:
    with pytest.raises(IntegrityError):
        split_slot(b"")
    assert split_slot(b"\x07") == (7, b"")
    for bad in (-1, 256):
        with pytest.raises(ValueError, match="one byte"):
            SlotCipher(FrameCipher(Suite.AES_256_GCM, KEY), bad)


def test_seal_targeted_layout_and_shared_control_seq() -> None:
    group = FrameCipher(Suite.AES_256_GCM, bytes(32))
    pair = FrameCipher(Suite.AES_256_GCM, KEY)
    outbox = Outbox(group)
    first = decode_frame(outbox.seal_control(b"\x02\x00\x00\x00\x01"))  # control seq 1
    raw = seal_targeted(outbox, pair, 200, b"\x02\x00\x00\x00\x05")
    frame = decode_frame(raw)
    assert (first.seq, frame.kind, frame.seq) == (1, Kind.CONTROL, 2)
    assert frame.payload[:2] == bytes((TARGETED_CONTROL, 200))
    assert len(frame.payload) == 2 + 5 + TAG_SIZE
    ad = bytes((TARGETED_CONTROL, 200))
    assert pair.open(Kind.CONTROL, 2, frame.payload[2:], ad) == b"\x02\x00\x00\x00\x05"
    with pytest.raises(IntegrityError):  # another slot in the AD
        pair.open(Kind.CONTROL, 2, frame.payload[2:], bytes((TARGETED_CONTROL, 201)))
    with pytest.raises(IntegrityError):  # sealed with the pairwise key, not the group key
        group.open(Kind.CONTROL, 2, frame.payload[2:], ad)
    assert decode_frame(outbox.seal_control(b"\x03")).seq == 3
