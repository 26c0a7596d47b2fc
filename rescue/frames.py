"""Relay frames (protocol v1, section 5): an 8-byte header and an opaque payload.

Layout of the header, all big-endian::

    byte 0     version      always 1
    byte 1     kind         0 control, 1 data, 2 heartbeat, 3 close, 4 ack
    bytes 2-3  payload_len  u16, equals the number of bytes after the header
    bytes 4-7  seq          u32, the sender's own sequence number (the relay ignores it)

The relay calls :func:`check_frame` once per relayed message and looks at nothing else:
it validates the header and returns the kind, so the message can be forwarded unchanged.
:func:`encode_frame` and :func:`decode_frame` are the full codec, for peers and tests.

This module is sans-I/O: it turns bytes into values and back, and knows no sockets.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from rescue.codes import CloseCode

VERSION = 1
HEADER_SIZE = 8
MAX_PAYLOAD = 0xFFFF
MAX_SEQ = 0xFFFF_FFFF

_HEADER = struct.Struct(">BBHI")
# The hot path reads only version, kind and payload_len: a precompiled unpack of the first
# four bytes measured faster than indexing the bytes one at a time (see check_frame).
_unpack_prefix = struct.Struct(">BBH").unpack_from


class Kind(enum.IntEnum):
    """The kind byte of a frame header."""

    CONTROL = 0
    DATA = 1
    HEARTBEAT = 2
    CLOSE = 3
    ACK = 4


_MAX_KIND = int(max(Kind))


class FrameError(Exception):
    """A frame was refused; close the connection with ``close_code`` and say ``detail``."""

    def __init__(self, close_code: CloseCode, detail: str) -> None:
        super().__init__(f"{close_code.reason}: {detail}")
        self.close_code = close_code
        self.detail = detail


def check_frame(data: bytes) -> int:
    """Validate a frame's header and return its kind as a plain int (one of :class:`Kind`).

    Only the header is read; the payload is never touched. Raises :class:`FrameError` with
    ``PROTOCOL_ERROR`` for a message shorter than the header, a version other than 1 or a
    ``payload_len`` that differs from the payload's length, and with ``UNSUPPORTED_DATA`` for
    an unknown kind (when the header is otherwise well formed).
    """
    # Hot path, called once per relayed message: one C call, three int comparisons, no enum.
    # The literals are VERSION, HEADER_SIZE and max(Kind); literals measured a few ns faster
    # than global lookups.
    version: int
    kind: int
    payload_len: int
    try:
        version, kind, payload_len = _unpack_prefix(data)
    except struct.error:
        raise _diagnose(data) from None
    if version == 1 and payload_len + 8 == len(data) and kind <= 4:
        return kind
    raise _diagnose(data)


def _diagnose(data: bytes) -> FrameError:
    """Explain why ``data`` is not a well-formed frame (slow path of :func:`check_frame`)."""
    size = len(data)
    if size < HEADER_SIZE:
        return FrameError(CloseCode.PROTOCOL_ERROR,
                          f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, kind, payload_len, _seq = _HEADER.unpack_from(data)
    if version != VERSION:
        return FrameError(CloseCode.PROTOCOL_ERROR,
                          f"unsupported frame version {version}; this relay speaks {VERSION}")
    if payload_len != size - HEADER_SIZE:
        return FrameError(CloseCode.PROTOCOL_ERROR,
                          f"header says payload_len {payload_len} but the payload has "
                          f"{size - HEADER_SIZE} bytes")
    if kind > _MAX_KIND:
        return FrameError(CloseCode.UNSUPPORTED_DATA, f"unknown frame kind {kind}")
    raise AssertionError("_diagnose called on a well-formed frame")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its kind, the sender's sequence number and the payload."""

    kind: Kind
    seq: int
    payload: bytes


def encode_frame(kind: Kind | int, seq: int, payload: bytes) -> bytes:
    """Return the wire bytes of one frame: the 8-byte header followed by ``payload``.

    Raises ``ValueError`` for an unknown kind, a ``seq`` outside the u32 range or a payload
    longer than 65535 bytes.
    """
    kind = Kind(kind)
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} is outside the u32 range 0..{MAX_SEQ}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD} bytes")
    return _HEADER.pack(VERSION, kind, len(payload), seq) + payload


def decode_frame(data: bytes) -> Frame:
    """Decode one whole frame; raises :class:`FrameError` exactly when :func:`check_frame` does."""
    kind = check_frame(data)
    seq: int = _HEADER.unpack_from(data)[3]
    return Frame(Kind(kind), seq, bytes(data[HEADER_SIZE:]))
