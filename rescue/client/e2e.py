"""End-to-end cryptography between peers (e2e spec, sections 1-3), sans-I/O.

The relay only ever sees frame headers; everything here happens between the host and its
participants. A participant and the host run an authenticated X25519 key exchange bound to
the session's pre-shared key (PSK): both derive pairwise keys (participant to host, host to
participant) from the shared secret with HKDF-SHA256 (salt = PSK, info = label || transcript
hash), and the host hands over its broadcast **group key** wrapped under a pairwise key.
Frames are then sealed with an AEAD whose associated data starts with the frame header.

This module turns values into bytes and back and never touches a socket. Only primitives of
the ``cryptography`` package are used.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rescue.client.errors import HandshakeError, IntegrityError, NegotiationError, WrongPskError
from rescue.frames import _HEADER, MAX_PAYLOAD, MAX_SEQ, VERSION


class Suite(enum.IntEnum):
    """An AEAD cipher suite; the value is its number on the wire."""

    AES_256_GCM = 1
    CHACHA20_POLY1305 = 2


class RejectReason(enum.IntEnum):
    """Why a host rejected a participant's handshake."""

    NO_COMMON_SUITE = 1
    BAD_CONFIRM = 2
    FORGOTTEN = 3  # the host no longer holds keys for this participant: handshake again


SUITES_ALL: frozenset[Suite] = frozenset(Suite)
TAG_SIZE = 16
KEY_SIZE = 32
PUBKEY_SIZE = 32
NONCE_SIZE = 16
MIN_PSK_SIZE = 16
MAX_PEER_ID_BYTES = 128
WRAPPED_SIZE = KEY_SIZE + 4 + 1 + TAG_SIZE
SEALED_CONTROL = 0x10
WRONG_PSK = "wrong PSK: the peer does not share this session's secret"

_OFFER, _ACCEPT, _CONFIRM, _REJECT = 0x01, 0x02, 0x03, 0x04
_TRANSCRIPT_LABEL = b"beach-rescue/e2e/v1"
_NONCE = struct.Struct(">B3xQ")
_WRAP_NONCE = bytes(12)
_U32 = struct.Struct(">I")


def nonce(kind: int, seq: int) -> bytes:
    """The 12-byte AEAD nonce of a frame: ``u8 kind || 3 zero bytes || u64 seq``."""
    return _NONCE.pack(kind, seq)


def header(kind: int, seq: int, payload_len: int) -> bytes:
    """The 8-byte frame header (version 1) that starts a frame's associated data."""
    return _HEADER.pack(VERSION, kind, payload_len, seq)


def _aead(suite: Suite, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return AESGCM(key) if suite is Suite.AES_256_GCM else ChaCha20Poly1305(key)


class FrameCipher:
    """One AEAD key of one suite, sealing and opening frame payloads.

    The associated data of a frame is ``header(kind, seq, len) || extra_ad`` where ``len`` is
    the length of the whole frame payload, ``len(extra_ad) + len(ciphertext)``: every use of
    extra associated data in the spec (sealed control's ``0x10``, a host ack's ``str8
    to_peer_id``) is also the payload's prefix, so the AD header is the real frame header.
    """

    __slots__ = ("_aead", "suite")

    def __init__(self, suite: Suite, key: bytes) -> None:
        """Bind ``key`` (32 bytes, else ``ValueError``) to ``suite``."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"AEAD key must be {KEY_SIZE} bytes, got {len(key)}")
        self.suite = Suite(suite)
        self._aead = _aead(self.suite, key)

    def seal(self, kind: int, seq: int, plaintext: bytes, extra_ad: bytes = b"") -> bytes:
        """Return ciphertext and tag; the caller puts ``extra_ad`` (if any) before them.

        ``ValueError`` if the frame payload would exceed 65535 bytes, ``seq`` is not a u32 or
        ``kind`` not a u8.
        """
        size = len(extra_ad) + len(plaintext) + TAG_SIZE
        if not (0 <= seq <= MAX_SEQ and 0 <= kind <= 0xFF):
            raise ValueError(f"kind {kind} or seq {seq} is out of range (u8, u32)")
        if size > MAX_PAYLOAD:
            raise ValueError(f"sealed payload of {size} bytes exceeds {MAX_PAYLOAD} bytes")
        ad = header(kind, seq, size) + extra_ad
        return self._aead.encrypt(nonce(kind, seq), plaintext, ad)

    def open(self, kind: int, seq: int, payload: bytes, extra_ad: bytes = b"") -> bytes:
        """Authenticate and decrypt what :meth:`seal` returned; ``IntegrityError`` on failure."""
        size = len(extra_ad) + len(payload)
        if (0 <= seq <= MAX_SEQ and 0 <= kind <= 0xFF and len(payload) >= TAG_SIZE
                and size <= MAX_PAYLOAD):
            try:
                ad = header(kind, seq, size) + extra_ad
                return self._aead.decrypt(nonce(kind, seq), payload, ad)
            except InvalidTag:
                pass
        raise IntegrityError(f"frame failed authentication (kind {kind} seq {seq})")


# --- handshake messages --------------------------------------------------------------------

def _str8(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def _check_peer_id(peer_id: str) -> None:
    size = len(peer_id.encode())
    if not 1 <= size <= MAX_PEER_ID_BYTES:
        raise ValueError(f"peer id must be 1..{MAX_PEER_ID_BYTES} bytes of UTF-8, got {size}")


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


@dataclass(frozen=True, slots=True)
class Offer:
    """A participant's opening message: the suites it supports, its ephemeral key and nonce."""

    suites: frozenset[Suite]
    eph_pub: bytes
    nonce: bytes
    peer_id: str

    def __post_init__(self) -> None:
        _check_size("ephemeral public key", self.eph_pub, PUBKEY_SIZE)
        _check_size("handshake nonce", self.nonce, NONCE_SIZE)
        _check_peer_id(self.peer_id)

    def encode(self) -> bytes:
        """The control payload ``0x01 | suites_mask | eph_pub | nonce | str8 peer_id``."""
        mask = sum(1 << (suite - 1) for suite in self.suites)
        return bytes([_OFFER, mask]) + self.eph_pub + self.nonce + _str8(self.peer_id)


@dataclass(frozen=True, slots=True)
class Accept:
    """The host's answer to an offer: suite, ephemeral key, nonce and the wrapped group key."""

    suite: Suite
    eph_pub: bytes
    nonce: bytes
    to_peer_id: str
    wrapped: bytes

    def __post_init__(self) -> None:
        _check_size("ephemeral public key", self.eph_pub, PUBKEY_SIZE)
        _check_size("handshake nonce", self.nonce, NONCE_SIZE)
        _check_peer_id(self.to_peer_id)
        _check_size("wrapped group key", self.wrapped, WRAPPED_SIZE)

    def encode(self) -> bytes:
        """The control payload ``0x02 | suite | eph_pub | nonce | str8 to_peer_id | wrapped``."""
        return (bytes([_ACCEPT, self.suite]) + self.eph_pub + self.nonce
                + _str8(self.to_peer_id) + self.wrapped)


@dataclass(frozen=True, slots=True)
class Confirm:
    """A participant's proof that it derived the same keys: HMAC-SHA256(k_confirm, th)."""

    peer_id: str
    mac: bytes

    def __post_init__(self) -> None:
        _check_peer_id(self.peer_id)
        _check_size("confirm MAC", self.mac, 32)

    def encode(self) -> bytes:
        """The control payload ``0x03 | str8 peer_id | mac``."""
        return bytes([_CONFIRM]) + _str8(self.peer_id) + self.mac


@dataclass(frozen=True, slots=True)
class Reject:
    """The host's refusal of a participant's handshake (unauthenticated)."""

    to_peer_id: str
    reason: RejectReason

    def __post_init__(self) -> None:
        _check_peer_id(self.to_peer_id)

    def encode(self) -> bytes:
        """The control payload ``0x04 | str8 to_peer_id | reason``."""
        return bytes([_REJECT]) + _str8(self.to_peer_id) + bytes([self.reason])


HandshakeMessage = Offer | Accept | Confirm | Reject


class _Reader:
    """Consumes a payload left to right; a short read raises ``ValueError``."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("message is truncated")
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def str8(self) -> str:
        return self.take(self.u8()).decode()  # UnicodeDecodeError is a ValueError

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes")


def parse_handshake(payload: bytes) -> HandshakeMessage:
    """Decode a plaintext handshake control payload.

    ``IntegrityError`` for malformed bytes (unknown type, wrong lengths, bad UTF-8, unknown
    suite or reason). A sealed control payload (byte 0 is ``0x10``) is no handshake message:
    ``ValueError``, callers check byte 0 first.
    """
    if payload[:1] == bytes([SEALED_CONTROL]):
        raise ValueError("a sealed control payload is not a handshake message")
    reader = _Reader(bytes(payload))
    try:
        kind = reader.u8()
        message: HandshakeMessage
        if kind == _OFFER:
            mask = reader.u8()
            suites = frozenset(suite for suite in Suite if mask & (1 << (suite - 1)))
            message = Offer(suites, reader.take(PUBKEY_SIZE), reader.take(NONCE_SIZE),
                            reader.str8())
        elif kind == _ACCEPT:
            suite = Suite(reader.u8())
            message = Accept(suite, reader.take(PUBKEY_SIZE), reader.take(NONCE_SIZE),
                             reader.str8(), reader.take(WRAPPED_SIZE))
        elif kind == _CONFIRM:
            message = Confirm(reader.str8(), reader.take(32))
        elif kind == _REJECT:
            message = Reject(reader.str8(), RejectReason(reader.u8()))
        else:
            raise ValueError(f"unknown handshake message type {kind:#04x}")
        reader.end()
    except ValueError as exc:
        raise IntegrityError(f"malformed handshake message: {exc}") from None
    return message


# --- key schedule --------------------------------------------------------------------------

def transcript_hash(  # noqa: PLR0917 - the spec's field order, positional by contract
        session_id: str, participant_peer_id: str, suite: Suite, p_eph_pub: bytes,
        n_p: bytes, h_eph_pub: bytes, n_h: bytes) -> bytes:
    """SHA-256 over the label, both ids, the suite, both ephemeral keys and both nonces."""
    return hashlib.sha256(
        _TRANSCRIPT_LABEL + _str8(session_id) + _str8(participant_peer_id) + bytes([suite])
        + p_eph_pub + n_p + h_eph_pub + n_h).digest()


def shared_secret(private_key: X25519PrivateKey, peer_pub: bytes) -> bytes:
    """The X25519 shared secret; ``HandshakeError`` for a bad key or an all-zero output."""
    try:
        secret = private_key.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    except ValueError:  # cryptography refuses low-order points itself
        secret = bytes(32)
    if not any(secret):
        raise HandshakeError("the peer's ephemeral key gives an all-zero X25519 secret")
    return secret


def derive_key(psk: bytes, secret: bytes, label: bytes, th: bytes) -> bytes:
    """HKDF-SHA256(salt = PSK, ikm = secret, info = label || th), 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=psk,
                info=label + th).derive(secret)


def confirm_mac(k_confirm: bytes, th: bytes) -> bytes:
    """HMAC-SHA256(k_confirm, th), the MAC a participant sends in its confirm."""
    return hmac.new(k_confirm, th, hashlib.sha256).digest()


@dataclass(frozen=True)
class PairKeys:
    """The pairwise ciphers of one participant: participant to host and host to participant."""

    p2h: FrameCipher
    h2p: FrameCipher


@dataclass(frozen=True)
class ParticipantKeys:
    """What a participant holds after its handshake with a host."""

    pair: PairKeys
    group: FrameCipher
    start_seq: int
    host_eph_pub: bytes
    slot: int  # the one-byte tag in front of this participant's frames to the host


@dataclass(frozen=True)
class _Schedule:
    """Every key one handshake derives."""

    th: bytes
    pair: PairKeys
    k_wrap: bytes
    k_confirm: bytes


def _schedule(psk: bytes, secret: bytes, th: bytes, suite: Suite) -> _Schedule:
    def key(label: bytes) -> bytes:
        return derive_key(psk, secret, label, th)

    pair = PairKeys(FrameCipher(suite, key(b"p2h")), FrameCipher(suite, key(b"h2p")))
    return _Schedule(th, pair, key(b"wrap"), key(b"confirm"))


def _check_session(session_id: str, psk: bytes) -> None:
    if not 1 <= len(session_id.encode()) <= 0xFF:
        raise ValueError("session id must be 1..255 bytes of UTF-8")
    if len(psk) < MIN_PSK_SIZE:
        raise ValueError(f"PSK must be at least {MIN_PSK_SIZE} bytes, got {len(psk)}")


def _public(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


class ParticipantHandshake:
    """The participant's side of the key exchange with one host.

    ``private_key`` and ``nonce`` are fresh random values unless injected (test vectors).
    """

    def __init__(self, session_id: str, peer_id: str, psk: bytes,
                 suites: frozenset[Suite] = SUITES_ALL, *,
                 private_key: X25519PrivateKey | None = None, nonce: bytes | None = None) -> None:
        """Validate the inputs (``ValueError``) and make the ephemeral key and nonce."""
        _check_session(session_id, psk)
        _check_peer_id(peer_id)
        if not suites:
            raise ValueError("a participant must support at least one suite")
        self.session_id, self.peer_id, self._psk = session_id, peer_id, bytes(psk)
        self.suites = frozenset(Suite(suite) for suite in suites)
        self._private = private_key or X25519PrivateKey.generate()
        self._nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        _check_size("handshake nonce", self._nonce, NONCE_SIZE)

    def offer(self) -> Offer:
        """The offer to send to the host (the same every call)."""
        return Offer(self.suites, _public(self._private), self._nonce, self.peer_id)

    def on_accept(self, accept: Accept) -> tuple[ParticipantKeys, Confirm]:
        """Derive the keys from the host's accept and return them with the confirm to send.

        ``ValueError`` if the accept names another participant; ``NegotiationError`` if its
        suite was not offered; ``WrongPskError`` if ``wrapped`` does not open (PSKs differ);
        ``HandshakeError`` for an unusable host key.
        """
        if accept.to_peer_id != self.peer_id:
            raise ValueError(f"accept is addressed to {accept.to_peer_id!r}, not {self.peer_id!r}")
        if accept.suite not in self.suites:
            raise NegotiationError(f"host chose suite {accept.suite.name}, which was not offered")
        secret = shared_secret(self._private, accept.eph_pub)
        th = transcript_hash(self.session_id, self.peer_id, accept.suite, _public(self._private),
                             self._nonce, accept.eph_pub, accept.nonce)
        keys = _schedule(self._psk, secret, th, accept.suite)
        try:
            opened = _aead(accept.suite, keys.k_wrap).decrypt(_WRAP_NONCE, accept.wrapped, th)
        except InvalidTag:
            raise WrongPskError(WRONG_PSK) from None
        group = FrameCipher(accept.suite, opened[:KEY_SIZE])
        (start_seq,) = _U32.unpack(opened[KEY_SIZE:KEY_SIZE + 4])
        participant_keys = ParticipantKeys(keys.pair, group, start_seq, accept.eph_pub,
                                           opened[KEY_SIZE + 4])
        return participant_keys, Confirm(self.peer_id, confirm_mac(keys.k_confirm, th))

    def on_reject(self, reject: Reject) -> HandshakeError:
        """The error that the host's reject stands for (returned, not raised).

        ``ValueError`` if the reject names another participant.
        """
        if reject.to_peer_id != self.peer_id:
            raise ValueError(f"reject is addressed to {reject.to_peer_id!r}, not {self.peer_id!r}")
        if reject.reason == RejectReason.NO_COMMON_SUITE:
            offered = ", ".join(sorted(suite.name for suite in self.suites))
            return NegotiationError(f"no common cipher suite: the host supports none of {offered}")
        if reject.reason == RejectReason.FORGOTTEN:
            return HandshakeError("the host forgot this participant (away longer than its "
                                  "resume timeout)")
        return WrongPskError(WRONG_PSK)


class HostHandshake:
    """The host's side of the key exchange: one per host channel, any number of participants.

    Each offer gets a fresh ephemeral key; the pending state per participant peer id lives
    until its confirm arrives (or a new offer from the same peer id replaces it).
    """

    def __init__(self, session_id: str, psk: bytes, suite: Suite = Suite.AES_256_GCM, *,
                 group_key: bytes | None = None) -> None:
        """Validate the inputs (``ValueError``) and make the group key (random if not given)."""
        _check_session(session_id, psk)
        self.session_id, self._psk, self.suite = session_id, bytes(psk), Suite(suite)
        self._group_key = os.urandom(KEY_SIZE) if group_key is None else bytes(group_key)
        self.group = FrameCipher(self.suite, self._group_key)
        self._pending: dict[str, _Schedule] = {}

    def on_offer(self, offer: Offer, start_seq: int, *, slot: int = 0,
                 private_key: X25519PrivateKey | None = None,
                 nonce: bytes | None = None) -> Accept | Reject:
        """Answer an offer: an accept with the group key, ``start_seq`` and ``slot``, or a reject.

        ``HandshakeError`` for an unusable participant key; ``ValueError`` for a ``start_seq``
        outside 1..2**32-1, a ``slot`` outside 0..255 or a nonce that is not 16 bytes.
        """
        if not 1 <= start_seq <= MAX_SEQ:
            raise ValueError(f"start_seq {start_seq} is outside 1..{MAX_SEQ}")
        if not 0 <= slot <= 255:
            raise ValueError(f"slot {slot} is outside 0..255")
        self._pending.pop(offer.peer_id, None)
        if self.suite not in offer.suites:
            return Reject(offer.peer_id, RejectReason.NO_COMMON_SUITE)
        private_key = private_key or X25519PrivateKey.generate()
        n_h = os.urandom(NONCE_SIZE) if nonce is None else nonce
        _check_size("handshake nonce", n_h, NONCE_SIZE)
        h_pub = _public(private_key)
        secret = shared_secret(private_key, offer.eph_pub)
        th = transcript_hash(self.session_id, offer.peer_id, self.suite, offer.eph_pub,
                             offer.nonce, h_pub, n_h)
        keys = _schedule(self._psk, secret, th, self.suite)
        wrapped = _aead(self.suite, keys.k_wrap).encrypt(
            _WRAP_NONCE, self._group_key + _U32.pack(start_seq) + bytes((slot,)), th)
        self._pending[offer.peer_id] = keys
        return Accept(self.suite, h_pub, n_h, offer.peer_id, wrapped)

    def on_confirm(self, confirm: Confirm) -> PairKeys:
        """Verify a confirm (constant time) and return that participant's pairwise ciphers.

        The pending state is consumed either way. ``WrongPskError`` for a bad MAC or a peer id
        with no pending handshake.
        """
        keys = self._pending.pop(confirm.peer_id, None)
        if keys is None:
            raise WrongPskError(f"confirm from {confirm.peer_id!r}, which has no pending handshake")
        if not hmac.compare_digest(confirm_mac(keys.k_confirm, keys.th), confirm.mac):
            raise WrongPskError(WRONG_PSK)
        return keys.pair

    def forget(self, peer_id: str) -> None:
        """Drop a participant's pending handshake (it left before confirming)."""
        self._pending.pop(peer_id, None)
