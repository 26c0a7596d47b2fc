"""The reliable, authenticated stream of one sender (e2e spec sections 3 to 5), sans-I/O.

An :class:`Outbox` seals a sender's messages into numbered frames, keeps them until every
receiver acked them (the replay buffer) and resends them. An :class:`Inbox` checks one remote
sender's order (duplicates only inside an announced resend window, gaps only while
recovering), reassembles messages and decides when to ack. Sealed control bodies and acks are
encoded here too; keys live behind :class:`Cipher` and time is a ``now`` argument.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from rescue.client.errors import ChannelError, GapError, IntegrityError, ReplayError
from rescue.frames import HEADER_SIZE, MAX_PAYLOAD, MAX_SEQ, Kind, encode_frame

TAG_SIZE = 16
#: Plaintext bytes per data frame after the flags byte (65518).
MAX_CHUNK = MAX_PAYLOAD - TAG_SIZE - 1
#: Control type of a sealed control frame; also the extra associated data of its AEAD.
SEALED_CONTROL = 0x10
RESEND = 0x01
RESEND_REQUEST = 0x02
LEAVE = 0x03
MORE = 0x01  # data frame flag: another fragment of the same message follows

_SEALED_PREFIX = bytes([SEALED_CONTROL])
_FRAME_OVERHEAD = HEADER_SIZE + 1 + TAG_SIZE
_RESEND_BODY = struct.Struct(">BII")
_U32 = struct.Struct(">I")


class Cipher(Protocol):
    """One direction's AEAD key. Nonce ``u8 kind || 3 zero bytes || u64 seq``; associated data
    the frame's own header followed by ``extra_ad``, which the caller puts in front of the
    sealed bytes in the payload (so the header's length counts both)."""

    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes:
        """Return the sealed bytes (ciphertext and 16-byte tag) of ``plaintext``."""
        ...

    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
        """Return the plaintext of ``payload``; IntegrityError if it does not authenticate."""
        ...


@dataclass(frozen=True, slots=True)
class Resend:
    """Sealed control ``0x01``: the stream frames ``from_seq..to_seq`` that follow are resent."""

    from_seq: int
    to_seq: int


@dataclass(frozen=True, slots=True)
class ResendRequest:
    """Sealed control ``0x02``: resend your stream from ``from_seq`` (the host names whom)."""

    from_seq: int
    to_peer_id: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """Sealed control ``0x03``: the sender is gone for good; hold nothing back for it."""


def encode_leave() -> bytes:
    """The body of a ``leave`` control."""
    return bytes([LEAVE])


def _str8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFF:
        raise ValueError(f"peer id of {len(raw)} bytes does not fit a str8")
    return bytes([len(raw)]) + raw


def encode_resend(from_seq: int, to_seq: int) -> bytes:
    """The body of a ``resend`` control; ValueError unless ``1 <= from_seq <= to_seq < 2**32``."""
    if not 1 <= from_seq <= to_seq <= MAX_SEQ:
        raise ValueError(f"bad resend range {from_seq}..{to_seq}")
    return _RESEND_BODY.pack(RESEND, from_seq, to_seq)


def encode_resend_request(from_seq: int, to_peer_id: str | None = None) -> bytes:
    """The body of a ``resend_request`` control; the host names the participant it asks."""
    if not 1 <= from_seq <= MAX_SEQ:
        raise ValueError(f"bad resend_request seq {from_seq}")
    body = bytes([RESEND_REQUEST]) + _U32.pack(from_seq)
    return body if to_peer_id is None else body + _str8(to_peer_id)


def parse_control_body(body: bytes) -> Resend | ResendRequest | Leave:
    """Decode an opened sealed-control body; IntegrityError for anything malformed."""
    if body == bytes([LEAVE]):
        return Leave()
    if len(body) == _RESEND_BODY.size and body[0] == RESEND:
        _, first, last = _RESEND_BODY.unpack(body)
        if 1 <= first <= last:
            return Resend(first, last)
    elif len(body) >= 5 and body[0] == RESEND_REQUEST:
        (first,) = _U32.unpack_from(body, 1)
        rest = body[5:]
        if first >= 1 and not rest:
            return ResendRequest(first)
        if first >= 1 and rest[0] == len(rest) - 1:
            try:
                return ResendRequest(first, rest[1:].decode())
            except UnicodeDecodeError:
                pass
    raise IntegrityError(f"malformed sealed control body {body[:16].hex()}")


def _open(cipher: Cipher, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
    try:
        return cipher.open(kind, seq, payload, extra_ad)
    except IntegrityError as exc:
        raise IntegrityError(f"{Kind(kind).name.lower()} frame seq {seq} failed "
                             "authentication") from exc


def open_control(cipher: Cipher, seq: int, payload: bytes) -> bytes:
    """Authenticate a sealed control payload (``0x10 || sealed``) and return its body, e.g.
    a host's request under ``k_h2p``; IntegrityError if not sealed control or not authentic."""
    if payload[:1] != _SEALED_PREFIX:
        raise IntegrityError(f"control frame seq {seq} is not a sealed control")
    return _open(cipher, Kind.CONTROL, seq, payload[1:], _SEALED_PREFIX)


def _frame_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


class Outbox:
    """One sender's stream: seals messages into frames and keeps them until every receiver acked.

    Frames are released when every current receiver acked them (with no receivers nothing is
    released). ``next_seq`` is the next stream seq; the seq ``2**32 - 1`` is never used: the
    frame that would need it raises ChannelError (rekeying is not in protocol v1).
    ``max_chunk`` is one less per cleartext byte the cipher puts in front (a participant's slot).
    """

    def __init__(self, cipher: Cipher, *, max_unacked_bytes: int = 4 << 20,
                 max_unacked_frames: int = 4096, max_chunk: int = MAX_CHUNK) -> None:
        if not 1 <= max_chunk <= MAX_CHUNK:
            raise ValueError(f"max_chunk {max_chunk} is outside 1..{MAX_CHUNK}")
        self._cipher = cipher
        self._chunk = max_chunk  # smaller when the cipher puts cleartext bytes in front
        self._overhead = _FRAME_OVERHEAD + MAX_CHUNK - max_chunk
        self._max_bytes = max_unacked_bytes
        self._max_frames = max_unacked_frames
        self.next_seq = 1
        self._next_control_seq = 1
        self._buffer: deque[tuple[int, bytes]] = deque()  # consecutive seqs, oldest first
        self._buffered_bytes = 0
        self._acked: dict[str, int] = {}
        self._closed = False

    @property
    def buffered_bytes(self) -> int:
        """Wire bytes (headers included) of the frames not yet acked by every receiver."""
        return self._buffered_bytes

    @property
    def buffered_frames(self) -> int:
        """Number of frames not yet acked by every receiver."""
        return len(self._buffer)

    def room_for(self, size: int) -> bool:
        """True if a message of ``size`` bytes fits the buffer bounds now (always when empty)."""
        if not self._buffer:
            return True
        frames = _frame_count(size, self._chunk)
        return (len(self._buffer) + frames <= self._max_frames
                and self._buffered_bytes + size + frames * self._overhead <= self._max_bytes)

    def seal_message(self, data: bytes) -> list[bytes]:
        """Seal one message into wire frames (MORE on all but the last), buffered until acked;
        the caller sends them now if connected. ChannelError after the close or if the message
        would need the seq ``2**32 - 1`` (nothing is sealed then)."""
        count, chunk = self._reserve(_frame_count(len(data), self._chunk)), self._chunk
        return [self._seal_stream(Kind.DATA, bytes([MORE if i < count - 1 else 0])
                                  + data[i * chunk:(i + 1) * chunk])
                for i in range(count)]

    def seal_close(self, reason: str) -> bytes:
        """Seal and buffer the close frame (kind 3) ending this stream; later seals fail."""
        raw = reason.encode()
        if len(raw) > self._chunk + 1:
            raise ValueError(f"close reason of {len(raw)} bytes does not fit one frame")
        self._reserve(1)
        frame = self._seal_stream(Kind.CLOSE, raw)
        self._closed = True
        return frame

    def _reserve(self, count: int) -> int:
        if self._closed:
            raise ChannelError("the stream is closed: nothing can be sent after close")
        if self.next_seq + count - 1 >= MAX_SEQ:
            raise ChannelError("stream seq space exhausted (2**32 - 1 frames); "
                               "rekeying is not supported in protocol v1")
        return count

    def _seal_stream(self, kind: Kind, plaintext: bytes) -> bytes:
        seq = self.next_seq
        frame = encode_frame(kind, seq, self._cipher.seal(kind, seq, plaintext))
        self.next_seq = seq + 1
        self._buffer.append((seq, frame))
        self._buffered_bytes += len(frame)
        return frame

    def add_receiver(self, receiver_id: str, *, start_seq: int | None = None) -> None:
        """Add a receiver that must ack; it needs frames from ``start_seq`` (default ``next_seq``).
        Host: each participant, with its accept's ``start_seq``; participant: ``"host"``.
        A receiver already present keeps its ack position."""
        first = self.next_seq if start_seq is None else start_seq
        if not 1 <= first <= self.next_seq:
            raise ValueError(f"start_seq {first} is outside 1..{self.next_seq}")
        self._acked.setdefault(receiver_id, first - 1)
        self._release()

    def acked_by(self, receiver_id: str) -> int:
        """The highest seq ``receiver_id`` acknowledged (``start_seq - 1`` before any ack);
        KeyError for a receiver not added."""
        return self._acked[receiver_id]

    def oldest_seq(self) -> int:
        """The oldest buffered seq, or ``next_seq`` when nothing is buffered."""
        return self._buffer[0][0] if self._buffer else self.next_seq

    def remove_receiver(self, receiver_id: str) -> None:
        """Forget a receiver (left for good or closed); frames only it held back are released."""
        self._acked.pop(receiver_id, None)
        self._release()

    def on_ack(self, receiver_id: str, seq: int) -> None:
        """Record an authenticated cumulative ack; IntegrityError if ``seq`` was never sent.
        Lower or repeated acks and acks of unknown receivers are ignored."""
        if seq >= self.next_seq:
            raise IntegrityError(f"ack for seq {seq}, which was never sent "
                                 f"(next seq {self.next_seq})")
        if seq > self._acked.get(receiver_id, seq):
            self._acked[receiver_id] = seq
            self._release()

    def _release(self) -> None:
        # Without receivers nobody will ever ask for these frames: a receiver added later
        # starts at next_seq.
        floor = min(self._acked.values()) if self._acked else self.next_seq - 1
        while self._buffer and self._buffer[0][0] <= floor:
            self._buffered_bytes -= len(self._buffer.popleft()[1])

    def resend(self, from_seq: int | None = None) -> list[bytes]:
        """A sealed ``resend(from, newest)`` control frame, then the buffered frames from ``from``.
        ``from_seq`` defaults to the oldest buffered seq; ``[]`` if there is nothing to resend.
        IntegrityError if ``from_seq`` was already released (acked by all) or never sent."""
        oldest = self.oldest_seq()
        first = oldest if from_seq is None else from_seq
        if first > self.next_seq:
            raise IntegrityError(f"resend requested from seq {first}, which was never sent")
        if first < oldest:
            raise IntegrityError(f"resend requested from seq {first}, which every receiver "
                                 "already acknowledged")
        frames = [frame for _, frame in islice(self._buffer, first - oldest, None)]
        if not frames:
            return []
        return [self.seal_control(encode_resend(first, self.next_seq - 1)), *frames]

    def seal_control(self, body: bytes, cipher: Cipher | None = None) -> bytes:
        """A sealed control frame (kind 0, header seq = this sender's next control seq);
        ``cipher`` overrides the stream key (the host's pairwise key for one participant), the
        control seq counter being shared by every key."""
        key = self._cipher if cipher is None else cipher
        seq = self.take_control_seq()
        return encode_frame(Kind.CONTROL, seq,
                            _SEALED_PREFIX + key.seal(Kind.CONTROL, seq, body, _SEALED_PREFIX))

    def take_control_seq(self) -> int:
        """Use up and return the next control seq (for control frames sealed elsewhere, such as
        the host's targeted ones); ChannelError once ``2**32 - 1`` would be reached."""
        seq = self._next_control_seq
        if seq >= MAX_SEQ:
            raise ChannelError("control seq space exhausted; rekeying is not supported in v1")
        self._next_control_seq = seq + 1
        return seq


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one incoming frame produced.

    ``messages``: whole application messages, in order. ``closed``: the sender's close
    reason. ``resend_request``: a sealed-control body (``resend_request(from=expected)``) to
    send back to the sender. ``resend_requested_from``: the peer asked this side to resend
    its *own* stream from there (answer with ``Outbox.resend``).
    """

    messages: list[bytes] = field(default_factory=list)
    closed: str | None = None
    resend_request: bytes | None = None
    resend_requested_from: int | None = None
    left: bool = False


class Inbox:
    """One remote sender's stream at this receiver: order checks, reassembly and ack policy.

    ``expected`` is the next stream seq to deliver. Frames below ``start_seq`` are not for
    this receiver and are dropped silently.
    """

    def __init__(self, cipher: Cipher, *, start_seq: int = 1, max_message_bytes: int = 16 << 20,
                 ack_every_frames: int = 16, ack_every_bytes: int = 256 << 10,
                 ack_delay_s: float = 0.05) -> None:
        self._cipher = cipher
        self._start_seq = start_seq
        self.expected = start_seq
        self._max_message_bytes = max_message_bytes
        self._every_frames = ack_every_frames
        self._every_bytes = ack_every_bytes
        self._ack_delay_s = ack_delay_s
        self._parts: list[bytes] = []
        self._part_bytes = 0
        self._closed: str | None = None
        self._recovering = False
        self._requested = False  # a resend_request went out in this recovering period
        self._window: tuple[int, int] | None = None
        self._last_duplicate = 0
        self._ack_after: int | None = None  # ack at once when the stream reaches this seq
        self._last_control_seq = 0
        self._unacked_frames = 0
        self._unacked_bytes = 0
        self._unacked_since: float | None = None
        self._ack_now = False

    @property
    def recovering(self) -> bool:
        """True while gaps are expected (after a reconnect or the sender's leave/join)."""
        return self._recovering

    @property
    def closed(self) -> str | None:
        """The close reason once the sender ended its stream, else None."""
        return self._closed

    def last_delivered(self) -> int:
        """The highest stream seq delivered in order (``expected - 1``)."""
        return self.expected - 1

    def start_recovering(self) -> None:
        """Expect gaps until the next in-order frame; re-ack what was delivered."""
        self._recovering = True
        self._requested = False
        self._ack_now = True

    def on_frame(self, kind: int, seq: int, payload: bytes, now: float) -> Delivery:
        """Handle a data or close frame of this stream; raises IntegrityError (or its
        subclasses ReplayError and GapError) for anything forged, replayed or lost."""
        if kind not in (Kind.DATA, Kind.CLOSE):
            raise ValueError(f"Inbox.on_frame takes data and close frames, not kind {kind}")
        if seq < self._start_seq:
            return Delivery()
        if seq < self.expected:
            return self._on_duplicate(kind, seq, payload)
        self._window = None
        if self._closed is not None:
            raise IntegrityError(f"frame seq {seq} after the stream was closed")
        plaintext = _open(self._cipher, kind, seq, payload)
        if seq > self.expected:
            return self._on_gap(seq)
        delivery = self._deliver(kind, plaintext)
        self.expected = seq + 1
        self._recovering = False
        if self._unacked_frames == 0:
            self._unacked_since = now
        self._unacked_frames += 1
        self._unacked_bytes += len(payload)
        self._note_resend_progress(seq)
        return delivery

    def _on_duplicate(self, kind: int, seq: int, payload: bytes) -> Delivery:
        window = self._window
        if window is None or seq > window[1] or seq <= self._last_duplicate:
            raise ReplayError(f"replayed frame seq {seq}")
        _open(self._cipher, kind, seq, payload)
        self._last_duplicate = seq
        self._note_resend_progress(seq)
        return Delivery()

    def _on_gap(self, seq: int) -> Delivery:
        if not self._recovering:
            raise GapError(f"frames lost between {self.expected} and {seq - 1}")
        if self._requested:
            return Delivery()
        self._requested = True
        return Delivery(resend_request=encode_resend_request(self.expected))

    def _deliver(self, kind: int, plaintext: bytes) -> Delivery:
        if kind == Kind.CLOSE:
            if self._parts:
                raise IntegrityError("close frame in the middle of a fragmented message")
            try:
                self._closed = plaintext.decode()
            except UnicodeDecodeError:
                raise IntegrityError("close reason is not UTF-8") from None
            self._ack_now = True
            return Delivery(closed=self._closed)
        if not plaintext or plaintext[0] & ~MORE:
            raise IntegrityError("data frame without a valid flags byte")
        self._part_bytes += len(plaintext) - 1
        if self._part_bytes > self._max_message_bytes:
            raise IntegrityError(f"message exceeds max_message_bytes "
                                 f"({self._max_message_bytes})")
        self._parts.append(plaintext[1:])
        if plaintext[0] & MORE:
            return Delivery()
        message = b"".join(self._parts)
        self._parts.clear()
        self._part_bytes = 0
        return Delivery(messages=[message])

    def _note_resend_progress(self, seq: int) -> None:
        if self._ack_after is not None and seq >= self._ack_after:
            self._ack_after = None
            self._ack_now = True

    def on_control(self, seq: int, payload: bytes) -> Delivery:
        """Handle a sealed control frame of this sender, opened with the stream cipher.

        A ``resend`` opens the duplicate window and gives an empty Delivery; a
        ``resend_request`` gives ``Delivery(resend_requested_from=...)``, a ``leave``
        ``Delivery(left=True)``. IntegrityError if it
        does not authenticate, ReplayError for a control seq not above the last one, GapError
        for a resend starting past ``expected`` while not recovering.
        """
        if seq <= self._last_control_seq:
            raise ReplayError(f"replayed control frame seq {seq}")
        control = parse_control_body(open_control(self._cipher, seq, payload))
        self._last_control_seq = seq
        if isinstance(control, ResendRequest):
            return Delivery(resend_requested_from=control.from_seq)
        if isinstance(control, Leave):
            return Delivery(left=True)
        if control.from_seq > self.expected and not self._recovering:
            raise GapError(f"frames lost between {self.expected} and {control.from_seq - 1}")
        self._window = (control.from_seq, control.to_seq)
        self._last_duplicate = control.from_seq - 1
        self._ack_after = control.to_seq
        return Delivery()

    def ack_deadline(self) -> float | None:
        """When :meth:`ack_due` becomes non-None by time alone: None if no ack is pending,
        ``-inf`` if one is already due whatever the time."""
        if self.expected <= self._start_seq:
            return None
        if (self._ack_now or self._unacked_frames >= self._every_frames
                or self._unacked_bytes >= self._every_bytes):
            return -math.inf
        if self._unacked_since is None:
            return None
        return self._unacked_since + self._ack_delay_s

    def ack_due(self, now: float) -> int | None:
        """The cumulative seq to ack now (by frames, bytes, delay, resend or re-ack), or None."""
        deadline = self.ack_deadline()
        if deadline is None or now < deadline:
            return None
        return self.expected - 1

    def ack_sent(self, seq: int, now: float) -> None:
        """Record an ack sent for ``seq``; one covering every delivery resets the counters."""
        if seq > self.expected - 1:
            raise ValueError(f"ack {seq} is beyond the last delivered seq {self.expected - 1}")
        if seq == self.expected - 1:
            self._ack_now = False
            self._unacked_frames = 0
            self._unacked_bytes = 0
            self._unacked_since = None
