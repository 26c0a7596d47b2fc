"""Participant slots: the one-byte sender tag on frames a host receives.

The relay forwards a participant's frames to the host without saying who sent them, so
each participant prefixes every post-handshake frame's payload with the slot the host gave
it in the handshake's ``accept``. The slot is also authenticated: it is part of the AEAD's
associated data, so a relay that moves a frame to another slot breaks its tag.
Host → participant acks and targeted control carry the receiver's slot the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from rescue.client.errors import IntegrityError
from rescue.frames import Kind, encode_frame

if TYPE_CHECKING:
    from rescue.client.stream import Outbox

#: Leading byte of a sealed control frame meant for one participant (sealed with its key).
TARGETED_CONTROL = 0x11


class _Cipher(Protocol):
    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes: ...
    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes: ...


def split_slot(payload: bytes) -> tuple[int, bytes]:
    """Split a slotted payload into (slot, rest); IntegrityError when it is empty."""
    if not payload:
        raise IntegrityError("frame too short to carry a participant slot")
    return payload[0], payload[1:]


class SlotCipher:
    """A cipher whose payloads carry (and authenticate) a one-byte slot in front."""

    def __init__(self, inner: _Cipher, slot: int) -> None:
        if not 0 <= slot <= 255:
            raise ValueError("a slot is one byte")
        self.inner = inner
        self.slot = slot
        self._tag = bytes((slot,))

    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes:
        """``slot || inner.seal(...)``; the associated data ends with ``extra_ad || slot``.

        Callers put the cleartext bytes in front of the payload in ``extra_ad`` (a sealed
        control frame's ``0x10``), so the AD extension is exactly the payload's cleartext
        prefix: ``0x10 || slot`` for control, ``slot`` for data, close and ack.
        """
        return self._tag + self.inner.seal(kind, seq, plaintext, extra_ad + self._tag)

    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
        """Check the slot byte and open the rest; IntegrityError on any mismatch."""
        slot, sealed = split_slot(payload)
        if slot != self.slot:
            raise IntegrityError(f"frame for slot {slot} reached slot {self.slot}'s stream")
        return self.inner.open(kind, seq, sealed, extra_ad + self._tag)


def seal_targeted(outbox: Outbox, cipher: _Cipher, slot: int, body: bytes) -> bytes:
    """A whole control frame for one participant: ``0x11 || slot || sealed body``.

    It takes the next control seq of the host's ``outbox`` (shared with the broadcast
    control frames, so no nonce repeats under any key).
    """
    seq = outbox.take_control_seq()
    ad = bytes((TARGETED_CONTROL, slot))
    return encode_frame(Kind.CONTROL, seq, ad + cipher.seal(Kind.CONTROL, seq, body, ad))
