"""Generate the end-to-end test vectors (tests/rescue/client/vectors/e2e-v1.json).

Every output is computed from fixed inputs with rescue.client.e2e; the JSON file freezes
them, so a test that recomputes the outputs fails when the construction changes. The two
X25519 private keys are those of RFC 7748, section 6.1, so the shared secret is the RFC's.

Run ``python tests/rescue/client/vectors/make_e2e_vectors.py`` to rewrite the file, only
after a deliberate change of the wire format (which needs a new protocol version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rescue.client.e2e import (
    SEALED_CONTROL,
    Accept,
    FrameCipher,
    HostHandshake,
    ParticipantHandshake,
    Suite,
    derive_key,
    shared_secret,
    transcript_hash,
)
from rescue.frames import Kind, encode_frame

VECTORS_PATH = Path(__file__).with_name("e2e-v1.json")

INPUTS: dict[str, Any] = {
    "session_id": "sess-e2e-vectors",
    "participant_peer_id": "participant-1",
    "psk": b"beach-rescue test vector PSK".hex(),
    "participant_private_key":
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    "host_private_key": "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    "participant_nonce": bytes(range(0x00, 0x10)).hex(),
    "host_nonce": bytes(range(0x10, 0x20)).hex(),
    "group_key": bytes(range(0x40, 0x60)).hex(),
    "start_seq": 1,
    "slot": 7,
    "suite": 1,
    "offered_suites": [1, 2],
    "data_seq": 1,
    "data_plaintext": b"\x00hello".hex(),
    "ack_seq": 1,
    "control_seq": 1,
    "control_body": (b"\x01" + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")).hex(),
}


def _private(hex_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key))


def make_vectors(inputs: dict[str, Any] = INPUTS) -> dict[str, Any]:
    """Run a full handshake and seal sample frames from ``inputs``; return inputs and outputs."""
    session_id, peer_id = inputs["session_id"], inputs["participant_peer_id"]
    psk, suite = bytes.fromhex(inputs["psk"]), Suite(inputs["suite"])
    p_key, h_key = _private(inputs["participant_private_key"]), _private(inputs["host_private_key"])
    n_p, n_h = bytes.fromhex(inputs["participant_nonce"]), bytes.fromhex(inputs["host_nonce"])

    offered = frozenset(Suite(number) for number in inputs["offered_suites"])
    participant = ParticipantHandshake(session_id, peer_id, psk, offered,
                                       private_key=p_key, nonce=n_p)
    host = HostHandshake(session_id, psk, suite, group_key=bytes.fromhex(inputs["group_key"]))
    offer = participant.offer()
    accept = host.on_offer(offer, inputs["start_seq"], slot=inputs["slot"],
                           private_key=h_key, nonce=n_h)
    assert isinstance(accept, Accept)
    keys, confirm = participant.on_accept(accept)
    host.on_confirm(confirm)

    secret = shared_secret(p_key, accept.eph_pub)
    th = transcript_hash(session_id, peer_id, suite, offer.eph_pub, n_p, accept.eph_pub, n_h)
    derived = {f"k_{label}": derive_key(psk, secret, label.encode(), th).hex()
               for label in ("p2h", "h2p", "wrap", "confirm")}
    data_seq = inputs["data_seq"]
    data_payload = host.group.seal(Kind.DATA, data_seq, bytes.fromhex(inputs["data_plaintext"]))
    slot = bytes([inputs["slot"]])
    up_payload = slot + keys.pair.p2h.seal(Kind.DATA, data_seq,
                                           bytes.fromhex(inputs["data_plaintext"]), slot)
    ack_payload = slot + keys.pair.p2h.seal(Kind.ACK, inputs["ack_seq"], b"", slot)
    host_ack_payload = slot + FrameCipher(suite, bytes.fromhex(derived["k_h2p"])).seal(
        Kind.ACK, inputs["ack_seq"], b"", slot)
    sealed = bytes([SEALED_CONTROL])
    control_payload = sealed + host.group.seal(
        Kind.CONTROL, inputs["control_seq"], bytes.fromhex(inputs["control_body"]), sealed)
    outputs = {
        "participant_public_key": offer.eph_pub.hex(),
        "host_public_key": accept.eph_pub.hex(),
        "shared_secret": secret.hex(),
        "transcript_hash": th.hex(),
        **derived,
        "offer": offer.encode().hex(),
        "accept": accept.encode().hex(),
        "confirm": confirm.encode().hex(),
        "data_frame_payload": data_payload.hex(),
        "data_frame": encode_frame(Kind.DATA, data_seq, data_payload).hex(),
        "participant_data_payload": up_payload.hex(),
        "participant_ack_payload": ack_payload.hex(),
        "host_ack_payload": host_ack_payload.hex(),
        "sealed_control_payload": control_payload.hex(),
    }
    return {"inputs": dict(inputs), "outputs": outputs}


def write_vectors(path: Path = VECTORS_PATH) -> None:
    """Write the vectors of :data:`INPUTS` to ``path`` as indented JSON."""
    path.write_text(json.dumps(make_vectors(), indent=2) + "\n")


if __name__ == "__main__":
    write_vectors()
