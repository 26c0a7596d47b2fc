"""Tests for rescue.client.e2e: frame sealing, handshake messages and the key exchange."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.client.e2e import (
    SEALED_CONTROL,
    SUITES_ALL,
    TAG_SIZE,
    Accept,
    Confirm,
    FrameCipher,
    HostHandshake,
    Offer,
    ParticipantHandshake,
    ParticipantKeys,
    Reject,
    RejectReason,
    Suite,
    confirm_mac,
    derive_key,
    header,
    nonce,
    parse_handshake,
    shared_secret,
    transcript_hash,
)
from rescue.client.errors import HandshakeError, IntegrityError, NegotiationError, WrongPskError
from rescue.frames import MAX_PAYLOAD, MAX_SEQ, decode_frame
from tests.rescue.client.vectors.make_e2e_vectors import INPUTS, VECTORS_PATH, make_vectors

PROPERTY = settings(deadline=None, max_examples=200)
SESSION = "sess-1"
PSK = b"0123456789abcdef-session-secret"
KEY = bytes(range(32))
KINDS = st.sampled_from([0, 1, 3, 4])
SEQS = st.integers(0, MAX_SEQ)
SUITES = st.sampled_from(list(Suite))
PEER_IDS = st.text(min_size=1, max_size=32).filter(lambda text: len(text.encode()) <= 128)


def handshake(suite: Suite = Suite.AES_256_GCM, start_seq: int = 1, peer_id: str = "p1",
              host: HostHandshake | None = None, slot: int = 0,
              ) -> tuple[HostHandshake, ParticipantKeys, FrameCipher, FrameCipher]:
    """Run a whole handshake; return the host, the participant's keys and the host's pair."""
    host = host or HostHandshake(SESSION, PSK, suite)
    participant = ParticipantHandshake(SESSION, peer_id, PSK)
    accept = host.on_offer(participant.offer(), start_seq, slot=slot)
    assert isinstance(accept, Accept)
    keys, confirm = participant.on_accept(accept)
    pair = host.on_confirm(confirm)
    return host, keys, pair.p2h, pair.h2p


# --- nonce, header, FrameCipher ------------------------------------------------------------

def test_nonce_is_kind_three_zero_bytes_and_u64_seq() -> None:
    assert nonce(4, 0x0102030405060708) == bytes([4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert nonce(0, 0) == bytes(12)
    assert nonce(1, MAX_SEQ) == b"\x01" + bytes(7) + b"\xff\xff\xff\xff"


def test_header_is_the_frame_header() -> None:
    assert header(3, 0x01020304, 0x0506) == bytes([1, 3, 5, 6, 1, 2, 3, 4])


@pytest.mark.parametrize("suite", list(Suite))
def test_seal_returns_the_payload_and_authenticates_the_header(suite: Suite) -> None:
    cipher = FrameCipher(suite, KEY)
    payload = cipher.seal(1, 7, b"\x00hi")
    assert len(payload) == 3 + TAG_SIZE
    assert cipher.open(1, 7, payload) == b"\x00hi"
    # The AD is the real frame header of a frame carrying this payload, by hand:
    ad = bytes([1, 1]) + len(payload).to_bytes(2, "big") + (7).to_bytes(4, "big")
    raw = cipher._aead.decrypt(bytes([1, 0, 0, 0]) + (7).to_bytes(8, "big"), payload, ad)
    assert raw == b"\x00hi"


def test_extra_ad_is_authenticated_and_counted_in_the_header_length() -> None:
    cipher = FrameCipher(Suite.AES_256_GCM, KEY)
    prefix = bytes([SEALED_CONTROL])
    sealed = cipher.seal(0, 2, b"body", prefix)
    ad = header(0, 2, len(prefix) + len(sealed)) + prefix
    assert AESGCM(KEY).decrypt(nonce(0, 2), sealed, ad) == b"body"
    assert cipher.open(0, 2, sealed, prefix) == b"body"
    with pytest.raises(IntegrityError):
        cipher.open(0, 2, sealed)
    with pytest.raises(IntegrityError):
        cipher.open(0, 2, sealed, b"\x11")


def test_suites_and_keys_do_not_open_each_other() -> None:
    aes, chacha = FrameCipher(Suite.AES_256_GCM, KEY), FrameCipher(Suite.CHACHA20_POLY1305, KEY)
    other = FrameCipher(Suite.AES_256_GCM, bytes(32))
    with pytest.raises(IntegrityError, match=r"frame failed authentication \(kind 1 seq 5\)"):
        chacha.open(1, 5, aes.seal(1, 5, b"x"))
    with pytest.raises(IntegrityError):
        other.open(1, 5, aes.seal(1, 5, b"x"))


def test_seal_limits() -> None:
    cipher = FrameCipher(Suite.AES_256_GCM, KEY)
    biggest = MAX_PAYLOAD - TAG_SIZE
    assert len(cipher.seal(1, 1, bytes(biggest))) == MAX_PAYLOAD
    with pytest.raises(ValueError, match="exceeds 65535"):
        cipher.seal(1, 1, bytes(biggest + 1))
    with pytest.raises(ValueError, match="exceeds 65535"):
        cipher.seal(0, 1, bytes(biggest), b"\x10")
    assert len(cipher.seal(1, MAX_SEQ, b"")) == TAG_SIZE
    for seq in (-1, MAX_SEQ + 1):
        with pytest.raises(ValueError, match="out of range"):
            cipher.seal(1, seq, b"")
    with pytest.raises(ValueError, match="32 bytes"):
        FrameCipher(Suite.AES_256_GCM, bytes(16))


@pytest.mark.parametrize("payload", [b"", bytes(TAG_SIZE - 1), bytes(MAX_PAYLOAD + 1)])
def test_open_refuses_impossible_payloads_as_integrity_errors(payload: bytes) -> None:
    with pytest.raises(IntegrityError):
        FrameCipher(Suite.CHACHA20_POLY1305, KEY).open(1, 1, payload)


@pytest.mark.parametrize(("kind", "seq"), [(1, -1), (1, MAX_SEQ + 1), (256, 1), (-1, 1)])
def test_open_with_out_of_range_kind_or_seq_is_an_integrity_error(kind: int, seq: int) -> None:
    with pytest.raises(IntegrityError):
        FrameCipher(Suite.AES_256_GCM, KEY).open(kind, seq, bytes(TAG_SIZE))


@PROPERTY
@given(suite=SUITES, kind=KINDS, seq=SEQS, plaintext=st.binary(max_size=64),
       extra_ad=st.binary(max_size=16), data=st.data())
def test_any_single_bit_flip_fails_authentication(
        *, suite: Suite, kind: int, seq: int, plaintext: bytes, extra_ad: bytes,
        data: st.DataObject) -> None:
    cipher = FrameCipher(suite, KEY)
    payload = cipher.seal(kind, seq, plaintext, extra_ad)
    assert cipher.open(kind, seq, payload, extra_ad) == plaintext
    target = data.draw(st.sampled_from(["kind", "seq", "payload", "extra_ad", "truncate"]))
    if target == "kind":
        kind ^= 1 << data.draw(st.integers(0, 7))
    elif target == "seq":
        seq ^= 1 << data.draw(st.integers(0, 31))
    elif target == "payload":
        bit = data.draw(st.integers(0, len(payload) * 8 - 1))
        payload = bytes(b ^ (1 << bit % 8) if i == bit // 8 else b for i, b in enumerate(payload))
    elif target == "extra_ad" and extra_ad:
        bit = data.draw(st.integers(0, len(extra_ad) * 8 - 1))
        extra_ad = bytes(b ^ (1 << bit % 8) if i == bit // 8 else b
                         for i, b in enumerate(extra_ad))
    else:  # truncation changes the header's payload_len
        payload = payload[:-1]
    with pytest.raises(IntegrityError, match="frame failed authentication"):
        cipher.open(kind, seq, payload, extra_ad)


# --- handshake messages --------------------------------------------------------------------

OFFERS = st.builds(Offer, st.frozensets(SUITES), st.binary(min_size=32, max_size=32),
                   st.binary(min_size=16, max_size=16), PEER_IDS)
ACCEPTS = st.builds(Accept, SUITES, st.binary(min_size=32, max_size=32),
                    st.binary(min_size=16, max_size=16), PEER_IDS,
                    st.binary(min_size=53, max_size=53))
CONFIRMS = st.builds(Confirm, PEER_IDS, st.binary(min_size=32, max_size=32))
REJECTS = st.builds(Reject, PEER_IDS, st.sampled_from(list(RejectReason)))
MESSAGES = st.one_of(OFFERS, ACCEPTS, CONFIRMS, REJECTS)


@PROPERTY
@given(MESSAGES)
def test_every_message_round_trips(message: Offer | Accept | Confirm | Reject) -> None:
    encoded = message.encode()
    assert parse_handshake(encoded) == message
    assert parse_handshake(encoded).encode() == encoded


def test_message_layouts_by_hand() -> None:
    pub, n = bytes(range(32)), bytes(range(16))
    offer = Offer(frozenset({Suite.CHACHA20_POLY1305}), pub, n, "pé")
    assert offer.encode() == b"\x01\x02" + pub + n + b"\x03p\xc3\xa9"
    assert Offer(SUITES_ALL, pub, n, "p").encode()[1] == 3
    accept = Accept(Suite.AES_256_GCM, pub, n, "p", bytes(53))
    assert accept.encode() == b"\x02\x01" + pub + n + b"\x01p" + bytes(53)
    assert Confirm("p", bytes(32)).encode() == b"\x03\x01p" + bytes(32)
    assert Reject("p", RejectReason.BAD_CONFIRM).encode() == b"\x04\x01p\x02"


def test_offer_mask_ignores_unknown_suite_bits() -> None:
    encoded = bytearray(Offer(frozenset({Suite.AES_256_GCM}), bytes(32), bytes(16), "p").encode())
    encoded[1] = 0b1111_1101
    parsed = parse_handshake(bytes(encoded))
    assert isinstance(parsed, Offer)
    assert parsed.suites == {Suite.AES_256_GCM}


@pytest.mark.parametrize("field_name", ["eph_pub", "nonce", "peer_id"])
def test_message_constructors_validate_fields(field_name: str) -> None:
    good = Offer(SUITES_ALL, bytes(32), bytes(16), "p")
    bad: dict[str, Any] = {"eph_pub": bytes(31), "nonce": bytes(17), "peer_id": ""}
    with pytest.raises(ValueError):
        replace(good, **{field_name: bad[field_name]})


def test_peer_id_limit_is_128_utf8_bytes() -> None:
    assert Confirm("é" * 64, bytes(32)).peer_id == "é" * 64
    with pytest.raises(ValueError, match=r"1\.\.128 bytes"):
        Confirm("é" * 64 + "x", bytes(32))


VALID = {
    "offer": Offer(SUITES_ALL, bytes(32), bytes(16), "p").encode(),
    "accept": Accept(Suite.AES_256_GCM, bytes(32), bytes(16), "p", bytes(53)).encode(),
    "confirm": Confirm("p", bytes(32)).encode(),
    "reject": Reject("p", RejectReason.NO_COMMON_SUITE).encode(),
}
MALFORMED = {
    "empty": b"",
    "unknown type": b"\x05\x01p",
    "type zero": b"\x00" + VALID["confirm"][1:],
    "offer truncated": VALID["offer"][:-1],
    "offer trailing byte": VALID["offer"] + b"\x00",
    "offer empty peer id": VALID["offer"][:-2] + b"\x00",
    "accept unknown suite": b"\x02\x03" + VALID["accept"][2:],
    "accept short wrapped": VALID["accept"][:-1],
    "confirm long mac": VALID["confirm"] + b"\x00",
    "confirm bad utf-8": b"\x03\x01\xff" + bytes(32),
    "reject unknown reason": b"\x04\x01p\x09",
    "reject no reason": b"\x04\x01p",
    "peer id over 128 bytes": b"\x04\x81" + b"p" * 129 + b"\x01",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_handshake_payloads_are_integrity_errors(payload: bytes) -> None:
    with pytest.raises(IntegrityError, match="malformed handshake message"):
        parse_handshake(payload)


def test_sealed_control_is_not_a_handshake_message() -> None:
    with pytest.raises(ValueError, match="sealed control") as info:
        parse_handshake(b"\x10" + bytes(40))
    assert not isinstance(info.value, IntegrityError)


def parse_or_refuse(payload: bytes) -> Offer | Accept | Confirm | Reject | None:
    """Parse ``payload``; ``None`` when refused the documented way, else any other error escapes."""
    try:
        return parse_handshake(payload)
    except IntegrityError:
        return None
    except ValueError:
        assert payload[0] == SEALED_CONTROL
        return None


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=200))
def test_fuzzed_payloads_parse_or_raise_integrity_error(payload: bytes) -> None:
    message = parse_or_refuse(payload)
    if message is not None:
        assert parse_handshake(message.encode()) == message


@settings(deadline=None, max_examples=500)
@given(st.sampled_from(list(VALID.values())), st.data())
def test_mutated_messages_parse_or_raise_integrity_error(base: bytes, data: st.DataObject) -> None:
    payload = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["set", "cut", "grow"]))
        if action == "set" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del payload[data.draw(st.integers(0, len(payload))):]
        else:
            payload += data.draw(st.binary(min_size=1, max_size=8))
    message = parse_or_refuse(bytes(payload))
    if message is not None and not isinstance(message, Offer):  # an offer drops unknown bits
        assert message.encode() == bytes(payload)


# --- the key exchange ----------------------------------------------------------------------

@pytest.mark.parametrize("suite", list(Suite))
def test_handshake_gives_both_sides_the_same_keys(suite: Suite) -> None:
    host, keys, p2h, h2p = handshake(suite, start_seq=42, slot=201)
    assert keys.start_seq == 42
    assert keys.slot == 201
    assert keys.group.suite is keys.pair.p2h.suite is p2h.suite is suite
    assert p2h.open(1, 1, keys.pair.p2h.seal(1, 1, b"\x00up")) == b"\x00up"
    assert keys.pair.h2p.open(4, 9, h2p.seal(4, 9, b"", b"\x02p1"), b"\x02p1") == b""
    assert keys.group.open(1, 42, host.group.seal(1, 42, b"\x00down")) == b"\x00down"
    # The directions and the group use distinct keys.
    with pytest.raises(IntegrityError):
        h2p.open(1, 1, keys.pair.p2h.seal(1, 1, b"x"))
    with pytest.raises(IntegrityError):
        keys.group.open(1, 1, h2p.seal(1, 1, b"x"))


def test_host_group_key_is_shared_and_pairwise_keys_are_not() -> None:
    host = HostHandshake(SESSION, PSK, group_key=KEY)
    _, first, p2h_first, _ = handshake(host=host, peer_id="p1")
    _, second, _, _ = handshake(host=host, peer_id="p2")
    sealed = host.group.seal(1, 3, b"all")
    assert first.group.open(1, 3, sealed) == second.group.open(1, 3, sealed) == b"all"
    assert FrameCipher(Suite.AES_256_GCM, KEY).open(1, 3, sealed) == b"all"
    with pytest.raises(IntegrityError):
        p2h_first.open(1, 1, second.pair.p2h.seal(1, 1, b"x"))
    assert first.host_eph_pub != second.host_eph_pub


def test_participant_detects_a_wrong_psk() -> None:
    host = HostHandshake(SESSION, b"another secret of the host")
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    accept = host.on_offer(participant.offer(), 1)
    assert isinstance(accept, Accept)
    with pytest.raises(WrongPskError, match="wrong PSK"):
        participant.on_accept(accept)


def test_transcript_binding_detects_a_relay_changing_the_accept() -> None:
    host = HostHandshake(SESSION, PSK)
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    accept = host.on_offer(participant.offer(), 1)
    assert isinstance(accept, Accept)
    with pytest.raises(WrongPskError):
        participant.on_accept(replace(accept, nonce=bytes(16)))


@pytest.mark.parametrize("bit", [0, 7, 100, 255])
def test_host_refuses_a_tampered_confirm_and_forgets_the_participant(bit: int) -> None:
    host = HostHandshake(SESSION, PSK)
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    accept = host.on_offer(participant.offer(), 1)
    assert isinstance(accept, Accept)
    _, confirm = participant.on_accept(accept)
    mac = bytearray(confirm.mac)
    mac[bit // 8] ^= 1 << bit % 8
    with pytest.raises(WrongPskError, match="wrong PSK"):
        host.on_confirm(replace(confirm, mac=bytes(mac)))
    with pytest.raises(WrongPskError, match="no pending handshake"):
        host.on_confirm(confirm)


def test_host_detects_a_participant_with_another_psk() -> None:
    host = HostHandshake(SESSION, PSK)
    private, n_p = X25519PrivateKey.generate(), bytes(16)
    offer = ParticipantHandshake(SESSION, "p1", PSK, private_key=private, nonce=n_p).offer()
    accept = host.on_offer(offer, 1)
    assert isinstance(accept, Accept)
    th = transcript_hash(SESSION, "p1", accept.suite, offer.eph_pub, n_p, accept.eph_pub,
                         accept.nonce)
    wrong = derive_key(b"not the session secret", shared_secret(private, accept.eph_pub),
                       b"confirm", th)
    with pytest.raises(WrongPskError):
        host.on_confirm(Confirm("p1", confirm_mac(wrong, th)))


def test_new_offer_replaces_the_pending_handshake() -> None:
    host = HostHandshake(SESSION, PSK)
    old, new = ParticipantHandshake(SESSION, "p1", PSK), ParticipantHandshake(SESSION, "p1", PSK)
    old_accept, new_accept = host.on_offer(old.offer(), 1), host.on_offer(new.offer(), 5)
    assert isinstance(old_accept, Accept)
    assert isinstance(new_accept, Accept)
    _, old_confirm = old.on_accept(old_accept)
    new_keys, _ = new.on_accept(new_accept)
    assert new_keys.start_seq == 5
    with pytest.raises(WrongPskError):
        host.on_confirm(old_confirm)  # consumes the pending state of p1
    host2 = HostHandshake(SESSION, PSK)
    host2.on_offer(old.offer(), 1)
    accept = host2.on_offer(new.offer(), 1)
    assert isinstance(accept, Accept)
    keys, confirm = new.on_accept(accept)
    assert host2.on_confirm(confirm).p2h.open(1, 1, keys.pair.p2h.seal(1, 1, b"ok")) == b"ok"


def test_forget_drops_a_pending_handshake() -> None:
    host = HostHandshake(SESSION, PSK)
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    accept = host.on_offer(participant.offer(), 1)
    assert isinstance(accept, Accept)
    _, confirm = participant.on_accept(accept)
    host.forget("p1")
    with pytest.raises(WrongPskError, match="no pending handshake"):
        host.on_confirm(confirm)


def test_no_common_suite_is_rejected() -> None:
    host = HostHandshake(SESSION, PSK, Suite.CHACHA20_POLY1305)
    participant = ParticipantHandshake(SESSION, "p1", PSK, frozenset({Suite.AES_256_GCM}))
    reject = host.on_offer(participant.offer(), 1)
    assert reject == Reject("p1", RejectReason.NO_COMMON_SUITE)
    error = participant.on_reject(reject)
    assert type(error) is NegotiationError
    assert "AES_256_GCM" in str(error)


def test_reject_reasons_map_to_errors() -> None:
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    error = participant.on_reject(Reject("p1", RejectReason.BAD_CONFIRM))
    assert isinstance(error, WrongPskError)
    assert "wrong PSK" in str(error)
    with pytest.raises(ValueError, match="addressed to 'p2'"):
        participant.on_reject(Reject("p2", RejectReason.BAD_CONFIRM))


def test_accept_for_another_participant_or_an_unoffered_suite() -> None:
    host = HostHandshake(SESSION, PSK, Suite.CHACHA20_POLY1305)
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    accept = host.on_offer(participant.offer(), 1)
    assert isinstance(accept, Accept)
    with pytest.raises(ValueError, match="addressed to 'p2'"):
        participant.on_accept(replace(accept, to_peer_id="p2"))
    picky = ParticipantHandshake(SESSION, "p1", PSK, frozenset({Suite.AES_256_GCM}))
    with pytest.raises(NegotiationError):
        picky.on_accept(accept)


# Low-order points: X25519 with any of them yields the all-zero secret.
LOW_ORDER = [bytes(32), b"\x01" + bytes(31)]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_all_zero_shared_secret_is_refused_on_both_sides(point: bytes) -> None:
    host = HostHandshake(SESSION, PSK)
    with pytest.raises(HandshakeError, match="all-zero"):
        host.on_offer(Offer(SUITES_ALL, point, bytes(16), "p1"), 1)
    participant = ParticipantHandshake(SESSION, "p1", PSK)
    with pytest.raises(HandshakeError, match="all-zero"):
        participant.on_accept(Accept(Suite.AES_256_GCM, point, bytes(16), "p1", bytes(53)))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="PSK must be at least 16 bytes"):
        ParticipantHandshake(SESSION, "p1", bytes(15))
    with pytest.raises(ValueError, match="PSK must be at least 16 bytes"):
        HostHandshake(SESSION, bytes(15))
    with pytest.raises(ValueError, match="peer id"):
        ParticipantHandshake(SESSION, "x" * 129, PSK)
    with pytest.raises(ValueError, match="nonce"):
        ParticipantHandshake(SESSION, "p1", PSK, nonce=bytes(15))
    with pytest.raises(ValueError, match="at least one suite"):
        ParticipantHandshake(SESSION, "p1", PSK, frozenset())
    with pytest.raises(ValueError, match="session id"):
        HostHandshake("", PSK)
    with pytest.raises(ValueError, match="32 bytes"):
        HostHandshake(SESSION, PSK, group_key=bytes(31))
    host = HostHandshake(SESSION, PSK)
    offer = ParticipantHandshake(SESSION, "p1", PSK).offer()
    for start_seq in (0, MAX_SEQ + 1):
        with pytest.raises(ValueError, match="start_seq"):
            host.on_offer(offer, start_seq)
    for slot in (-1, 256):
        with pytest.raises(ValueError, match="slot"):
            host.on_offer(offer, 1, slot=slot)
    with pytest.raises(ValueError, match="nonce"):
        host.on_offer(offer, 1, nonce=bytes(8))


def test_fresh_ephemeral_keys_and_nonces_per_handshake() -> None:
    first, second = (ParticipantHandshake(SESSION, "p1", PSK).offer() for _ in range(2))
    assert first.eph_pub != second.eph_pub
    assert first.nonce != second.nonce
    host = HostHandshake(SESSION, PSK)
    one, two = host.on_offer(first, 1), host.on_offer(second, 1)
    assert isinstance(one, Accept)
    assert isinstance(two, Accept)
    assert one.eph_pub != two.eph_pub
    assert one.nonce != two.nonce


# --- test vectors --------------------------------------------------------------------------

def test_vectors_file_matches_the_construction() -> None:
    stored = json.loads(VECTORS_PATH.read_text())
    assert stored["inputs"] == INPUTS
    assert make_vectors(stored["inputs"]) == stored


def test_vectors_follow_the_spec_by_hand() -> None:
    """Recompute the vectors from the spec's text with raw primitives, not the module."""
    vin = json.loads(VECTORS_PATH.read_text())["inputs"]
    out = {key: bytes.fromhex(value)
           for key, value in json.loads(VECTORS_PATH.read_text())["outputs"].items()}
    psk, n_p, n_h = (bytes.fromhex(vin[key]) for key in ("psk", "participant_nonce", "host_nonce"))
    peer = vin["participant_peer_id"].encode()
    str8_peer = bytes([len(peer)]) + peer
    # RFC 7748, section 6.1: the keys are Alice's and Bob's; so is the shared secret.
    assert out["shared_secret"].hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    th = hashlib.sha256(
        b"beach-rescue/e2e/v1" + bytes([len(vin["session_id"])]) + vin["session_id"].encode()
        + str8_peer + b"\x01" + out["participant_public_key"] + n_p
        + out["host_public_key"] + n_h).digest()
    assert out["transcript_hash"] == th
    for label in ("p2h", "h2p", "wrap", "confirm"):
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=psk, info=label.encode() + th)
        assert out[f"k_{label}"] == hkdf.derive(out["shared_secret"])
    assert out["offer"] == b"\x01\x03" + out["participant_public_key"] + n_p + str8_peer
    accept_head = b"\x02\x01" + out["host_public_key"] + n_h + str8_peer
    assert out["accept"].startswith(accept_head)
    wrapped = out["accept"][len(accept_head):]
    opened = AESGCM(out["k_wrap"]).decrypt(bytes(12), wrapped, th)
    assert opened == (bytes.fromhex(vin["group_key"]) + vin["start_seq"].to_bytes(4, "big")
                      + bytes([vin["slot"]]))
    mac = hmac.new(out["k_confirm"], th, hashlib.sha256).digest()
    assert out["confirm"] == b"\x03" + str8_peer + mac

    def hdr(kind: int, seq: int, size: int) -> bytes:
        return bytes([1, kind]) + size.to_bytes(2, "big") + seq.to_bytes(4, "big")

    def iv(kind: int, seq: int) -> bytes:
        return bytes([kind, 0, 0, 0]) + seq.to_bytes(8, "big")

    data = out["data_frame_payload"]
    group = AESGCM(bytes.fromhex(vin["group_key"]))
    assert group.decrypt(iv(1, 1), data, hdr(1, 1, len(data))) == b"\x00hello"
    assert out["data_frame"] == hdr(1, 1, len(data)) + data
    assert decode_frame(out["data_frame"]).payload == data
    slot = bytes([vin["slot"]])
    up = out["participant_data_payload"]
    assert up[:1] == slot
    assert AESGCM(out["k_p2h"]).decrypt(iv(1, 1), up[1:], hdr(1, 1, len(up)) + slot) \
        == b"\x00hello"
    ack = out["participant_ack_payload"]
    assert ack[:1] == slot
    assert AESGCM(out["k_p2h"]).decrypt(iv(4, 1), ack[1:], hdr(4, 1, 17) + slot) == b""
    host_ack = out["host_ack_payload"]
    assert host_ack[:1] == slot
    ad = hdr(4, 1, len(host_ack)) + slot
    assert AESGCM(out["k_h2p"]).decrypt(iv(4, 1), host_ack[1:], ad) == b""
    control = out["sealed_control_payload"]
    assert control[0] == 0x10
    body = group.decrypt(iv(0, 1), control[1:], hdr(0, 1, len(control)) + b"\x10")
    assert body == bytes.fromhex(vin["control_body"])
