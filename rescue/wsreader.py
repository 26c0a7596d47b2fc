"""Sans-I/O reader of client-to-server WebSocket frames (RFC 6455 section 5), for the hot path.

The relay's protocol feeds every ``data_received`` chunk to :meth:`FrameReader.feed`, then
calls :meth:`FrameReader.next_message` until it returns None; broken framing raises
:class:`ReadError` carrying the close code to send. Message sizes are checked from frame
headers, before any payload is buffered.

Speed: a chunk of whole frames is parsed in place (chunk and offset), each payload copied
out once to be unmasked. Chunks fed while a frame is incomplete wait in a list; once it is
whole, only its bytes are joined and the rest is parsed in place, so a byte is copied a
bounded number of times. Memory: only unreturned bytes are kept (with the chunk they are
in while it is mostly unparsed); an idle reader keeps nothing.
"""

from __future__ import annotations

import struct

from rescue.codes import CloseCode
from rescue.wsframe import OP_BINARY, OP_CONTINUATION, OP_PONG

try:
    from aiohttp._websocket.helpers import websocket_mask as _c_websocket_mask
except ImportError:  # pragma: no cover - aiohttp is a dependency, but the reader needs no C
    _HAVE_C_MASK = False
else:
    _HAVE_C_MASK = True

_U16 = struct.Struct(">H").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_CLOSE_CODE = struct.Struct(">H").unpack_from
#: Most frames one message may come in (a message's size limit alone would let empty
#: fragments pile up without bound).
MAX_FRAGMENTS = 1024
_MAX_CONTROL_PAYLOAD = 125
_VIEW_FROM = 8192  # payload length from which unmasking reads through a memoryview


class ReadError(Exception):
    """The client broke the framing rules; the connection must be closed with ``close_code``."""

    close_code: CloseCode
    detail: str

    def __init__(self, close_code: CloseCode, detail: str) -> None:
        super().__init__(f"{close_code.name}: {detail}")
        self.close_code = close_code
        self.detail = detail


def _unmask_python(mask: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """Return ``payload`` XORed with ``mask`` repeated, as one big-integer XOR (no C needed)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


if _HAVE_C_MASK:

    def unmask(mask: bytes, payload: bytes | bytearray | memoryview) -> bytes:
        """Return ``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 5.3)."""
        data = bytearray(payload)
        _c_websocket_mask(mask, data)
        return bytes(data)

else:  # pragma: no cover - exercised by the tests through a copy of this module
    unmask = _unmask_python


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a client's close frame payload (None, '' when empty).

    Raises ReadError for a 1-byte payload, a code not allowed on the wire or a reason
    that is not UTF-8.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ReadError(CloseCode.PROTOCOL_ERROR, "close payload of 1 byte")
    (code,) = _CLOSE_CODE(payload)
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise ReadError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ReadError(CloseCode.PROTOCOL_ERROR, "close reason is not valid UTF-8") from None
    return code, reason


class FrameReader:
    """Turns the bytes a client sends into whole messages; one instance per connection.

    Data messages have a total size limit of ``max_message_bytes`` (all fragments).
    After a :class:`ReadError` the reader is finished: every later :meth:`next_message`
    raises a ReadError with the same code and detail, and :meth:`feed` is ignored.
    """

    __slots__ = ("_chunk", "_error", "_fragment_opcode", "_fragment_size", "_fragments",
                 "_max_message_bytes", "_pending", "_pending_pos", "_pending_size", "_pos")

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._chunk = b""  # the bytes being parsed, from offset _pos on
        self._pos = 0
        self._pending: list[bytes] = []  # chunks fed after _chunk, not yet joined to it
        self._pending_pos = 0  # bytes of _pending[0] already joined into _chunk
        self._pending_size = 0  # bytes in _pending from _pending_pos on
        self._fragment_opcode = OP_CONTINUATION  # of the open fragmented message, if any
        self._fragments: list[bytes] = []  # its unmasked payloads so far
        self._fragment_size = 0
        self._error: tuple[CloseCode, str] | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        if not data or self._error is not None:
            return
        if self._pos == len(self._chunk) and not self._pending:
            self._chunk = data
            self._pos = 0
        else:
            self._pending.append(data)
            self._pending_size += len(data)

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as part of a message (unparsed bytes and the
        payload so far of an open fragmented message)."""
        return len(self._chunk) - self._pos + self._pending_size + self._fragment_size

    def _gather(self, needed: int) -> bool:
        """Make ``needed`` bytes contiguous in ``_chunk`` from ``_pos``; False if not fed yet.

        Only the bytes needed are joined: the rest of the last chunk they come from stays
        pending (from ``_pending_pos`` on), to be parsed in place once reached.
        """
        pending = self._pending
        if self._pos == len(self._chunk) and pending:  # go on in the next chunk, no copy
            self._chunk = pending.pop(0)
            self._pos = self._pending_pos
            self._pending_pos = 0
            self._pending_size -= len(self._chunk) - self._pos
        have = len(self._chunk) - self._pos
        if have >= needed:
            return True
        if have + self._pending_size < needed:
            if self._pos > have:  # mostly parsed: keep the unparsed tail, not the whole chunk
                self._chunk = self._chunk[self._pos :]
                self._pos = 0
            return False
        parts: list[bytes | memoryview] = [memoryview(self._chunk)[self._pos :]]
        missing = needed - have
        taken = 0
        while missing:
            piece = pending[taken]
            start = self._pending_pos
            rest = len(piece) - start
            if rest > missing:  # the needed bytes end inside this chunk
                parts.append(memoryview(piece)[start : start + missing])
                self._pending_pos = start + missing
                rest = missing
            else:
                parts.append(memoryview(piece)[start:] if start else piece)
                self._pending_pos = 0
                taken += 1
            missing -= rest
            self._pending_size -= rest
        del pending[:taken]
        self._chunk = b"".join(parts)
        self._pos = 0
        return True

    def _fail(self, close_code: CloseCode, detail: str) -> ReadError:
        """Finish the reader with an error, dropping all buffered data; return the error."""
        self._error = (close_code, detail)
        self._chunk = b""
        self._pos = 0
        self._pending = []
        self._pending_size = 0
        self._fragments = []
        self._fragment_size = 0
        return ReadError(close_code, detail)

    def next_message(self) -> tuple[int, bytes] | None:
        """The next complete message, or None when more bytes are needed. Raises ReadError.

        Returns ``(opcode, payload)``: a data message with its first frame's opcode, or a
        ping, pong or close frame, which may come between the fragments of a data message.
        """
        if self._error is not None:
            raise ReadError(*self._error)
        while True:
            chunk, pos = self._chunk, self._pos
            available = len(chunk) - pos
            if available < 2:
                if not self._gather(2):
                    return None
                chunk, pos = self._chunk, self._pos
                available = len(chunk) - pos
            first = chunk[pos]
            second = chunk[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            if not second & 0x80:
                raise self._fail(CloseCode.PROTOCOL_ERROR, "unmasked client frame")
            if first & 0x70:
                raise self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            if opcode > OP_BINARY:
                if opcode < 0x8 or opcode > OP_PONG:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                if not first & 0x80:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if length > _MAX_CONTROL_PAYLOAD:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
            header = 6 if length < 126 else 8 if length == 126 else 14
            if available < header:
                if not self._gather(header):
                    return None
                chunk, pos = self._chunk, self._pos
                available = len(chunk) - pos
            if length == 126:
                (length,) = _U16(chunk, pos + 2)
                if length < 126:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "non-minimal 16-bit length")
            elif length == 127:
                (length,) = _U64(chunk, pos + 2)
                if length >> 63:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "64-bit length with top bit set")
                if length < 65536:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "non-minimal 64-bit length")
            if opcode == OP_CONTINUATION:
                if not self._fragment_opcode:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "continuation without a message")
                if self._fragment_size + length > self._max_message_bytes:
                    raise self._fail(CloseCode.MESSAGE_TOO_BIG, "fragmented message too big")
            elif opcode <= OP_BINARY:
                if self._fragment_opcode:
                    raise self._fail(CloseCode.PROTOCOL_ERROR, "new message inside another")
                if length > self._max_message_bytes:
                    raise self._fail(CloseCode.MESSAGE_TOO_BIG, f"message of {length} bytes")
            if available < header + length:
                if not self._gather(header + length):
                    return None
                chunk, pos = self._chunk, self._pos
            start = pos + header
            end = start + length
            # Slicing is cheaper for short payloads, a view (one copy less) for long ones.
            body = chunk[start:end] if length < _VIEW_FROM else memoryview(chunk)[start:end]
            payload = unmask(chunk[start - 4 : start], body)
            if end == len(chunk):
                self._chunk = b""  # hold no reference to data already returned
                self._pos = 0
            else:
                self._pos = end
            if opcode > OP_BINARY:
                return opcode, payload
            if first & 0x80:
                if not opcode:
                    opcode = self._fragment_opcode
                    self._fragments.append(payload)
                    payload = b"".join(self._fragments)
                    self._fragments = []
                    self._fragment_opcode = OP_CONTINUATION
                    self._fragment_size = 0
                return opcode, payload
            if opcode:
                self._fragment_opcode = opcode
            elif len(self._fragments) >= MAX_FRAGMENTS - 1:
                # empty fragments would otherwise cost memory without counting toward the limit
                raise self._fail(CloseCode.PROTOCOL_ERROR,
                                 f"message in more than {MAX_FRAGMENTS} fragments")
            self._fragments.append(payload)
            self._fragment_size += length
