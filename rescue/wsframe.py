"""Server-to-client WebSocket frame encoding (RFC 6455 section 5.2), for the hot path.

The relay writes forwarded messages straight to the receiver's transport: a server frame
is unmasked, so it is a 2 to 10 byte header followed by the payload unchanged. Writing
the frame ourselves (instead of through ``WebSocketResponse.send_bytes``) keeps the
per-message work to one header lookup and one ``transport.writelines((header, payload))``
(a single ``writev``, the payload never copied), and leaves flow
control to the relay, which watches each receiver's write buffer itself.
"""

from __future__ import annotations

import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80
_LEN16 = struct.Struct(">BBH").pack
_LEN64 = struct.Struct(">BBQ").pack

_SMALL_BINARY = [bytes((_FIN | OP_BINARY, n)) for n in range(126)]


def frame_header(opcode: int, length: int) -> bytes:
    """Return the header of an unmasked, final frame of ``opcode`` carrying ``length`` bytes."""
    first = _FIN | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _LEN16(first, 126, length)
    return _LEN64(first, 127, length)


def binary_header(length: int) -> bytes:
    """Return the header of a binary frame of ``length`` bytes (cached for short ones)."""
    if length < 126:
        return _SMALL_BINARY[length]
    if length < 65536:
        return _LEN16(0x82, 126, length)
    return _LEN64(0x82, 127, length)


def binary_frame(payload: bytes) -> bytes:
    """Return a complete binary frame for ``payload`` (the relay's forwarding unit)."""
    n = len(payload)
    if n < 126:
        return _SMALL_BINARY[n] + payload
    if n < 65536:
        return _LEN16(0x82, 126, n) + payload
    return _LEN64(0x82, 127, n) + payload


def text_frame(text: str) -> bytes:
    """Return a complete text frame for ``text`` (relay events and hellos)."""
    data = text.encode()
    return frame_header(OP_TEXT, len(data)) + data


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """Return a ping or pong frame; control payloads are at most 125 bytes."""
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    return bytes((_FIN | opcode, len(payload))) + payload


_CLOSE_CODE = struct.Struct(">H").pack


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    """Return a close frame carrying ``code`` and ``reason`` (no payload when ``code`` is None).

    The reason is cut so the payload stays within a control frame's 125 bytes.
    """
    if code is None:
        return bytes((_FIN | OP_CLOSE, 0))
    payload = _CLOSE_CODE(code) + reason[:123]
    return bytes((_FIN | OP_CLOSE, len(payload))) + payload
