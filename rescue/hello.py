"""The text messages of protocol v1: the hello (section 4) and the relay's events (section 5).

A client opens with one :class:`ClientHello`; :func:`parse_client_hello` validates it and
refuses anything off-contract with a :class:`HelloError` whose ``detail`` is safe to send back
(it names the field at fault and never echoes more than a few characters of what the client
sent). The relay answers with :func:`encode_server_hello` and later tells peers about each other
with :func:`encode_peer_joined`, :func:`encode_peer_left` and :func:`encode_draining`.
:func:`parse_server_message` is the other direction, for clients and tests.

Unknown fields in any message are ignored, so that a later minor revision can add fields
without breaking older peers. This module is sans-I/O: strings and bytes in, values out.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Final, Literal, TypeAlias

import msgspec

from rescue.codes import CloseCode

PROTOCOL_VERSION: Final = 1
MAX_HELLO_BYTES: Final = 4096
"""Largest client hello accepted, in bytes of UTF-8."""

SESSION_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""Session ids: 1 to 128 characters of ``A-Z a-z 0-9 . _ -`` (use with ``fullmatch``)."""

PEER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Peer ids: 1 to 64 characters of ``A-Z a-z 0-9 . _ -`` (use with ``fullmatch``)."""

# Standard base64 of exactly 16 bytes is 24 characters: 21 that carry 6 bits each, one that
# carries the last 2 bits followed by four zero bits (so it is A, Q, g or w), then "==".
_NONCE_PATTERN: Final = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")

_MAX_ECHO = 32
"""At most this many characters of a client's value appear in an error detail."""

Role = Literal["host", "participant"]


def is_valid_session_id(s: str) -> bool:
    """Return whether ``s`` is a well-formed session id (1-128 of ``A-Z a-z 0-9 . _ -``)."""
    return SESSION_ID_PATTERN.fullmatch(s) is not None


def is_valid_peer_id(s: str) -> bool:
    """Return whether ``s`` is a well-formed peer id (1-64 of ``A-Z a-z 0-9 . _ -``)."""
    return PEER_ID_PATTERN.fullmatch(s) is not None


class HelloError(Exception):
    """A text message was refused; close with ``close_code`` and send ``detail`` as the reason.

    ``detail`` is human-readable and bounded: it never holds a long client-supplied string.
    """

    def __init__(self, close_code: CloseCode, detail: str) -> None:
        super().__init__(f"{close_code.reason}: {detail}")
        self.close_code = close_code
        self.detail = detail


# --- the client hello -------------------------------------------------------------------------


class ClientHello(msgspec.Struct, frozen=True):
    """The first message of a client: which session it joins, as whom, and what it speaks."""

    type: Literal["client_hello"]
    session_id: str
    role: Role
    protocol_version: int
    client_nonce: str
    compression: list[str]
    peer_id: str


class _VersionProbe(msgspec.Struct):
    """Just the version of a hello, read when the full hello does not decode."""

    protocol_version: int | None = None


_client_hello_decoder = msgspec.json.Decoder(ClientHello)
_version_probe_decoder = msgspec.json.Decoder(_VersionProbe)
_encoder = msgspec.json.Encoder()

# What a field must be, for the fields whose decode error would otherwise quote the sender.
_CLIENT_HELLO_RULES: Final = {
    "type": 'must be "client_hello"',
    "role": 'must be "host" or "participant"',
}
_SERVER_MESSAGE_RULES: Final = {
    "type": "names no known server message",
}
_EXPECTED = re.compile(r"Expected `([a-z|_ ]{1,40})`(?:, got `([a-z_]{1,20})`)?")
_MISSING_FIELD = re.compile(r"Object missing required field `([a-z_]{1,40})`")
_AT_PATH = re.compile(r" - at `\$((?:\.[a-z_]{1,40}|\[\d{1,6}\]){0,4})`$")


def parse_client_hello(data: str | bytes) -> ClientHello:
    """Decode and validate a client hello, or raise :class:`HelloError` (``PROTOCOL_ERROR``).

    Refused: more than :data:`MAX_HELLO_BYTES`, not a JSON object, a missing or mistyped
    field, a ``type`` other than ``"client_hello"``, an unsupported ``protocol_version``, a
    malformed session or peer id, a ``client_nonce`` that is not standard base64 of 16 bytes,
    and a ``compression`` list without ``"none"``. Unknown fields are ignored.
    """
    raw = _hello_bytes(data)
    try:
        hello = _client_hello_decoder.decode(raw)
    except msgspec.ValidationError as e:
        _refuse_unsupported_version(raw)
        raise _refusal(_explain_validation(str(e), "client hello", _CLIENT_HELLO_RULES)) from None
    except msgspec.DecodeError as e:
        raise _refusal(f"client hello is not valid JSON ({_clip(str(e), 60)})") from None
    except RecursionError:
        raise _refusal("client hello is nested too deeply") from None
    if hello.protocol_version != PROTOCOL_VERSION:
        raise _unsupported_version(hello.protocol_version)
    if not is_valid_session_id(hello.session_id):
        raise _refusal("field `session_id` must be 1-128 characters of A-Z a-z 0-9 . _ -")
    if not is_valid_peer_id(hello.peer_id):
        raise _refusal("field `peer_id` must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if _NONCE_PATTERN.fullmatch(hello.client_nonce) is None:
        raise _refusal("field `client_nonce` must be standard base64 of exactly 16 bytes "
                       "(24 characters ending in '==')")
    if "none" not in hello.compression:
        raise _refusal('field `compression` must include "none"')
    return hello


def encode_client_hello(hello: ClientHello) -> str:
    """Return the JSON text of ``hello`` as a client sends it (for clients and tests)."""
    return _encoder.encode(hello).decode()


def _hello_bytes(data: str | bytes) -> bytes:
    """Return the hello as UTF-8 bytes, refusing one over :data:`MAX_HELLO_BYTES`."""
    if len(data) > MAX_HELLO_BYTES:  # characters never outnumber their UTF-8 bytes
        raise _too_big(len(data))
    if isinstance(data, str):
        try:
            raw = data.encode()
        except UnicodeEncodeError:
            raise _refusal("client hello is not valid Unicode text") from None
        if len(raw) > MAX_HELLO_BYTES:
            raise _too_big(len(raw))
        return raw
    return data


def _too_big(size: int) -> HelloError:
    return _refusal(f"client hello of {size} bytes exceeds the {MAX_HELLO_BYTES}-byte limit")


def _refuse_unsupported_version(raw: bytes) -> None:
    """Raise the version refusal if ``raw`` names another protocol version.

    A hello from a newer protocol may lack fields of this one; telling such a client that
    its version is unsupported is more useful than naming a missing field.
    """
    try:
        version = _version_probe_decoder.decode(raw).protocol_version
    except (msgspec.MsgspecError, RecursionError):
        return
    if version is not None and version != PROTOCOL_VERSION:
        raise _unsupported_version(version)


def _unsupported_version(version: int) -> HelloError:
    return _refusal(f"unsupported protocol_version {_clip(str(version), 20)}; "
                    f"this relay speaks {PROTOCOL_VERSION}")


# --- the server's messages --------------------------------------------------------------------


class Peers(msgspec.Struct, frozen=True):
    """Who else is in the session when a peer joins: is a host there, how many participants."""

    host: bool
    participants: int


class ServerHello(msgspec.Struct, frozen=True, tag_field="type", tag="server_hello"):
    """The relay's answer to a valid client hello."""

    protocol_version: int
    ack_nonce: str
    server_nonce: str
    compression: str
    features: tuple[str, ...]
    heartbeat_s: int | float
    connection_id: str
    peers: Peers


class PeerJoined(msgspec.Struct, frozen=True, tag_field="type", tag="peer_joined"):
    """Event: another peer of the session completed its hello."""

    role: str
    peer_id: str


class PeerLeft(msgspec.Struct, frozen=True, tag_field="type", tag="peer_left"):
    """Event: another peer of the session went away, and why."""

    role: str
    peer_id: str
    reason: str


class Draining(msgspec.Struct, frozen=True, tag_field="type", tag="draining"):
    """Event: the relay will close this connection for a restart; reconnect after the delay."""

    reconnect_after_ms: int


ServerMessage: TypeAlias = ServerHello | PeerJoined | PeerLeft | Draining
_server_message_decoder: msgspec.json.Decoder[ServerMessage] = msgspec.json.Decoder(
    ServerMessage)


def new_server_nonce() -> str:
    """Return standard base64 of 16 fresh random bytes (a valid nonce for either side)."""
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


def encode_server_hello(*, ack_nonce: str, server_nonce: str, heartbeat_s: float,
                        connection_id: str, host_present: bool, participants: int,
                        features: Sequence[str] = ()) -> str:
    """Return the JSON text of the server hello, fields in the contract's order.

    ``heartbeat_s`` is written as an integer when it is whole (``15``, not ``15.0``).
    Raises ``ValueError`` when it is not a finite number.
    """
    if not math.isfinite(heartbeat_s):
        raise ValueError(f"heartbeat_s must be finite, not {heartbeat_s}")
    heartbeat: int | float = int(heartbeat_s) if float(heartbeat_s).is_integer() else heartbeat_s
    hello = ServerHello(
        protocol_version=PROTOCOL_VERSION, ack_nonce=ack_nonce, server_nonce=server_nonce,
        compression="none", features=tuple(features), heartbeat_s=heartbeat,
        connection_id=connection_id, peers=Peers(host=host_present, participants=participants))
    return _encoder.encode(hello).decode()


def encode_peer_joined(role: str, peer_id: str) -> str:
    """Return the JSON text of a ``peer_joined`` event."""
    return _encoder.encode(PeerJoined(role, peer_id)).decode()


def encode_peer_left(role: str, peer_id: str, reason: str) -> str:
    """Return the JSON text of a ``peer_left`` event."""
    return _encoder.encode(PeerLeft(role, peer_id, reason)).decode()


def encode_draining(reconnect_after_ms: int) -> str:
    """Return the JSON text of a ``draining`` event."""
    return _encoder.encode(Draining(reconnect_after_ms)).decode()


def parse_server_message(data: str | bytes) -> ServerMessage:
    """Decode one text message from the relay; raises :class:`HelloError` for anything else."""
    try:
        return _server_message_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise _refusal(_explain_validation(str(e), "server message",
                                               _SERVER_MESSAGE_RULES)) from None
    except msgspec.DecodeError as e:
        raise _refusal(f"server message is not valid JSON ({_clip(str(e), 60)})") from None
    except (RecursionError, UnicodeEncodeError):
        raise _refusal("server message is not decodable") from None


# --- error details ------------------------------------------------------------------------------


def _refusal(detail: str) -> HelloError:
    return HelloError(CloseCode.PROTOCOL_ERROR, detail)


def _clip(text: str, limit: int = _MAX_ECHO) -> str:
    """Return ``text`` cut to ``limit`` characters, marking the cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _explain_validation(message: str, what: str, rules: Mapping[str, str]) -> str:
    """Turn a msgspec validation message into a detail that names the field at fault.

    msgspec's messages may quote the offending value (an unknown literal, say); the detail
    is rebuilt from the parts that come from the schema (field and type names) only, with
    ``rules`` saying what a field must be where the type name alone would not.
    """
    missing = _MISSING_FIELD.fullmatch(message)
    if missing:
        return f"{what} is missing field `{missing.group(1)}`"
    at = _AT_PATH.search(message)
    path = at.group(1).lstrip(".") if at else ""
    reason = message[:at.start()] if at else message
    expected = _EXPECTED.fullmatch(reason)
    if not path:
        if expected and expected.group(1) == "object":
            return f"{what} must be a JSON object"
        return f"{what} is invalid"
    rule = rules.get(path)
    if rule is not None:
        return f"field `{path}` {rule}"
    if expected:
        got = f", not {expected.group(2)}" if expected.group(2) else ""
        return f"field `{path}` must be {expected.group(1)}{got}"
    return f"field `{path}` is invalid"
