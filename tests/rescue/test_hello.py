"""Tests for rescue.hello: the hello exchange and the relay's events (protocol v1, sections 4-5)."""

from __future__ import annotations

import base64
import json
import re
import string
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.codes import CloseCode
from rescue.hello import (
    MAX_HELLO_BYTES,
    SESSION_ID_PATTERN,
    ClientHello,
    Draining,
    HelloError,
    PeerJoined,
    PeerLeft,
    Peers,
    ServerHello,
    encode_client_hello,
    encode_draining,
    encode_peer_joined,
    encode_peer_left,
    encode_server_hello,
    is_valid_peer_id,
    is_valid_session_id,
    new_server_nonce,
    parse_client_hello,
    parse_server_message,
)

PROPERTY = settings(deadline=None, max_examples=200)
ID_ALPHABET = string.ascii_letters + string.digits + "._-"
NONCE = base64.b64encode(bytes(range(16))).decode()
FIELDS = ("type", "session_id", "role", "protocol_version", "client_nonce", "compression",
          "peer_id")


def hello_dict(**changes: Any) -> dict[str, Any]:
    """A valid client hello as a dict, with ``changes`` applied (None deletes a field)."""
    hello: dict[str, Any] = {
        "type": "client_hello", "session_id": "sess-1.A_b", "role": "participant",
        "protocol_version": 1, "client_nonce": NONCE, "compression": ["none"],
        "peer_id": "peer-7"}
    for key, value in changes.items():
        if value is None:
            del hello[key]
        else:
            hello[key] = value
    return hello


def refusal(data: str | bytes) -> str:
    """Parse ``data``, expect a PROTOCOL_ERROR refusal and return its detail."""
    with pytest.raises(HelloError) as info:
        parse_client_hello(data)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert info.value.detail in str(info.value)
    return info.value.detail


# --- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "session_ok", "peer_ok"), [
    ("a", True, True),
    ("A.z_0-9", True, True),
    ("x" * 64, True, True),
    ("x" * 65, True, False),
    ("x" * 128, True, False),
    ("x" * 129, False, False),
    ("", False, False),
    ("a b", False, False),
    ("a/b", False, False),
    ("abc\n", False, False),
    ("\u00e9t\u00e9", False, False),
    ("\uff41", False, False),  # fullwidth 'a': not ASCII
])
def test_id_validity(value: str, session_ok: bool, peer_ok: bool) -> None:
    assert is_valid_session_id(value) is session_ok
    assert is_valid_peer_id(value) is peer_ok


@given(st.text(max_size=140) | st.text(alphabet=ID_ALPHABET, max_size=140))
def test_id_validity_agrees_with_a_plain_reading_of_the_contract(value: str) -> None:
    only_allowed = all(c in ID_ALPHABET for c in value)
    assert is_valid_session_id(value) is (only_allowed and 1 <= len(value) <= 128)
    assert is_valid_peer_id(value) is (only_allowed and 1 <= len(value) <= 64)
    assert (SESSION_ID_PATTERN.fullmatch(value) is not None) is is_valid_session_id(value)


# --- the client hello: acceptance ----------------------------------------------------------------


def test_parse_client_hello_accepts_the_contract_example_as_text_and_bytes() -> None:
    text = json.dumps(hello_dict(role="host", compression=["zstd", "none"]))
    expected = ClientHello(type="client_hello", session_id="sess-1.A_b", role="host",
                           protocol_version=1, client_nonce=NONCE,
                           compression=["zstd", "none"], peer_id="peer-7")
    assert parse_client_hello(text) == expected
    assert parse_client_hello(text.encode()) == expected


def test_parse_client_hello_ignores_unknown_fields() -> None:
    text = json.dumps(hello_dict(telemetry=True, future={"nested": [1, 2, {"x": None}]}))
    assert parse_client_hello(text).peer_id == "peer-7"


def test_parse_client_hello_accepts_a_hello_of_exactly_the_size_limit() -> None:
    text = json.dumps(hello_dict(pad=""))
    text = json.dumps(hello_dict(pad="p" * (MAX_HELLO_BYTES - len(text))))
    assert len(text.encode()) == MAX_HELLO_BYTES
    assert parse_client_hello(text).session_id == "sess-1.A_b"


# --- the client hello: refusals ---------------------------------------------------------------


@pytest.mark.parametrize(("data", "detail"), [
    ("", "client hello is not valid JSON"),
    ("{", "client hello is not valid JSON"),
    ("hello", "client hello is not valid JSON"),
    (json.dumps(hello_dict()) + " x", "client hello is not valid JSON"),
    (b"\xff\xfe{}", "client hello is not valid JSON"),
    ("[1, 2]", "client hello must be a JSON object"),
    ('"client_hello"', "client hello must be a JSON object"),
    ("null", "client hello must be a JSON object"),
    ("42", "client hello must be a JSON object"),
    ("\ud800", "client hello is not valid Unicode text"),
])
def test_refuses_what_is_not_a_json_object(data: str | bytes, detail: str) -> None:
    assert refusal(data).startswith(detail)


def test_refuses_deeply_nested_json() -> None:
    data = '{"x":' + "[" * 2000 + "]" * 2000 + "}"
    assert len(data) <= MAX_HELLO_BYTES
    assert refusal(data) == "client hello is nested too deeply"


@pytest.mark.parametrize("field", FIELDS)
def test_refuses_a_missing_field_naming_it(field: str) -> None:
    assert refusal(json.dumps(hello_dict(**{field: None}))) == (
        f"client hello is missing field `{field}`")


@pytest.mark.parametrize(("changes", "detail"), [
    ({"type": "server_hello"}, 'field `type` must be "client_hello"'),
    ({"type": 1}, 'field `type` must be "client_hello"'),
    ({"role": "admin"}, 'field `role` must be "host" or "participant"'),
    ({"role": ["host"]}, 'field `role` must be "host" or "participant"'),
    ({"session_id": 5}, "field `session_id` must be str, not int"),
    ({"peer_id": False}, "field `peer_id` must be str, not bool"),
    ({"client_nonce": {}}, "field `client_nonce` must be str, not object"),
    ({"protocol_version": "1"}, "field `protocol_version` must be int, not str"),
    ({"protocol_version": True}, "field `protocol_version` must be int, not bool"),
    ({"protocol_version": 1.0}, "field `protocol_version` must be int, not float"),
    ({"compression": "none"}, "field `compression` must be array, not str"),
    ({"compression": ["none", 3]}, "field `compression[1]` must be str, not int"),
])
def test_refuses_a_mistyped_field_naming_it(changes: dict[str, Any], detail: str) -> None:
    assert refusal(json.dumps(hello_dict(**changes))) == detail


@pytest.mark.parametrize("session_id", ["", "x" * 129, "a b", "s/../x", "caf\u00e9", "a\n"])
def test_refuses_an_invalid_session_id(session_id: str) -> None:
    assert refusal(json.dumps(hello_dict(session_id=session_id))) == (
        "field `session_id` must be 1-128 characters of A-Z a-z 0-9 . _ -")


@pytest.mark.parametrize("peer_id", ["", "p" * 65, "peer 1", "peer:1"])
def test_refuses_an_invalid_peer_id(peer_id: str) -> None:
    assert refusal(json.dumps(hello_dict(peer_id=peer_id))) == (
        "field `peer_id` must be 1-64 characters of A-Z a-z 0-9 . _ -")


@pytest.mark.parametrize("version", [0, 2, -1, 99])
def test_refuses_another_protocol_version(version: int) -> None:
    assert refusal(json.dumps(hello_dict(protocol_version=version))) == (
        f"unsupported protocol_version {version}; this relay speaks 1")


def test_names_the_version_before_fields_a_newer_protocol_may_have_dropped() -> None:
    data = json.dumps({"type": "client_hello", "protocol_version": 2, "shiny": True})
    assert refusal(data) == "unsupported protocol_version 2; this relay speaks 1"


def test_clips_a_huge_protocol_version() -> None:
    detail = refusal(json.dumps(hello_dict(protocol_version=10**60)))
    assert detail.startswith("unsupported protocol_version 10000")
    assert "0" * 30 not in detail


@pytest.mark.parametrize("nonce", [
    base64.b64encode(bytes(15)).decode(),
    base64.b64encode(bytes(17)).decode(),
    base64.b64encode(bytes(32)).decode(),
    NONCE.rstrip("="),                                # padding missing
    "AAAAAAAAAAAAAAAAAAAAAB==",                       # 16 bytes, but not canonical
    base64.urlsafe_b64encode(b"\xfb" * 16).decode(),  # URL-safe alphabet
    "!" * 22 + "==",
    "",
    NONCE + "\n",
])
def test_refuses_a_client_nonce_that_is_not_base64_of_16_bytes(nonce: str) -> None:
    assert refusal(json.dumps(hello_dict(client_nonce=nonce))).startswith(
        "field `client_nonce` must be standard base64 of exactly 16 bytes")


@pytest.mark.parametrize("compression", [[], ["zstd"], ["None"], ["none "]])
def test_refuses_a_compression_list_without_none(compression: list[str]) -> None:
    assert refusal(json.dumps(hello_dict(compression=compression))) == (
        'field `compression` must include "none"')


def test_refuses_a_hello_over_the_size_limit() -> None:
    text = json.dumps(hello_dict(pad=""))
    text = json.dumps(hello_dict(pad="p" * (MAX_HELLO_BYTES + 1 - len(text))))
    assert refusal(text) == "client hello of 4097 bytes exceeds the 4096-byte limit"
    assert refusal(text.encode()).startswith("client hello of 4097 bytes")


def test_counts_the_size_limit_in_utf8_bytes_not_characters() -> None:
    text = json.dumps(hello_dict(pad="\u00e9" * 2100), ensure_ascii=False)
    assert len(text) < MAX_HELLO_BYTES < len(text.encode())
    assert refusal(text).endswith("exceeds the 4096-byte limit")


@pytest.mark.parametrize("field", ["type", "role", "session_id", "peer_id", "client_nonce"])
def test_details_never_echo_a_long_client_string(field: str) -> None:
    attack = "<script>" + "Z" * 500
    detail = refusal(json.dumps(hello_dict(**{field: attack})))
    assert "Z" * 33 not in detail
    assert "<script>" not in detail
    assert len(detail) < 120


def test_detail_does_not_echo_a_long_unknown_literal_inside_compression() -> None:
    detail = refusal(json.dumps(hello_dict(compression=["none", {"Z" * 300: 1}])))
    assert detail == "field `compression[1]` must be str, not object"


# --- the client hello: properties ---------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def assert_only_hello_errors(data: str | bytes) -> None:
    """Parsing ``data`` succeeds or raises HelloError with a bounded, non-empty detail."""
    try:
        parse_client_hello(data)
    except HelloError as e:
        assert e.close_code is CloseCode.PROTOCOL_ERROR
        assert 0 < len(e.detail) < 160


@settings(PROPERTY, max_examples=300)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_arbitrary_text_and_bytes_raise_only_hello_error(data: str | bytes) -> None:
    assert_only_hello_errors(data)


@PROPERTY
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values,
                       max_size=10))
def test_arbitrary_json_objects_raise_only_hello_error(obj: dict[str, Any]) -> None:
    assert_only_hello_errors(json.dumps(obj))


@PROPERTY
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_a_valid_hello_with_one_field_replaced_raises_only_hello_error(
        field: str, value: Any) -> None:
    data = json.dumps(hello_dict(**{field: value}) if value is not None else
                      {**hello_dict(), field: None})
    assert_only_hello_errors(data)


ids = st.text(alphabet=ID_ALPHABET, min_size=1)
json_safe_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)


@st.composite
def valid_hellos(draw: st.DrawFn) -> ClientHello:
    others = draw(st.lists(json_safe_text, max_size=4))
    compression = others[:]
    compression.insert(draw(st.integers(0, len(others))), "none")
    return ClientHello(
        type="client_hello",
        session_id=draw(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128)),
        role=draw(st.sampled_from(["host", "participant"])),
        protocol_version=1,
        client_nonce=base64.b64encode(draw(st.binary(min_size=16, max_size=16))).decode(),
        compression=compression,
        peer_id=draw(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=64)))


@PROPERTY
@given(hello=valid_hellos(),
       extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in FIELDS),
                             json_values, max_size=3))
def test_valid_hellos_round_trip(hello: ClientHello, extra: dict[str, Any]) -> None:
    assert parse_client_hello(encode_client_hello(hello)) == hello
    assert parse_client_hello(encode_client_hello(hello).encode()) == hello
    with_extras = {**msgspec.structs.asdict(hello), **extra}
    assert parse_client_hello(json.dumps(with_extras)) == hello


# --- the server's messages -------------------------------------------------------------------


def test_encode_server_hello_writes_exactly_the_contract_json() -> None:
    text = encode_server_hello(ack_nonce=NONCE, server_nonce="c2VydmVyLW5vbmNlLTEyMw==",
                               heartbeat_s=15.0, connection_id="c-1", host_present=True,
                               participants=2, features=["resume"])
    assert text == (
        '{"type":"server_hello","protocol_version":1,"ack_nonce":"' + NONCE + '",'
        '"server_nonce":"c2VydmVyLW5vbmNlLTEyMw==","compression":"none",'
        '"features":["resume"],"heartbeat_s":15,"connection_id":"c-1",'
        '"peers":{"host":true,"participants":2}}')


@pytest.mark.parametrize(("heartbeat_s", "written"), [
    (15.0, "15"), (15, "15"), (2.5, "2.5"), (600.0, "600"), (0.25, "0.25")])
def test_encode_server_hello_writes_whole_heartbeats_as_integers(
        heartbeat_s: float, written: str) -> None:
    text = encode_server_hello(ack_nonce=NONCE, server_nonce=NONCE, heartbeat_s=heartbeat_s,
                               connection_id="c", host_present=False, participants=0)
    assert f'"heartbeat_s":{written},' in text
    assert '"features":[]' in text


@pytest.mark.parametrize("heartbeat_s", [float("nan"), float("inf")])
def test_encode_server_hello_refuses_a_non_finite_heartbeat(heartbeat_s: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        encode_server_hello(ack_nonce=NONCE, server_nonce=NONCE, heartbeat_s=heartbeat_s,
                            connection_id="c", host_present=False, participants=0)


def test_server_hello_round_trips_through_parse_server_message() -> None:
    text = encode_server_hello(ack_nonce=NONCE, server_nonce=NONCE, heartbeat_s=7.5,
                               connection_id="conn", host_present=False, participants=3,
                               features=("a", "b"))
    assert parse_server_message(text) == ServerHello(
        protocol_version=1, ack_nonce=NONCE, server_nonce=NONCE, compression="none",
        features=("a", "b"), heartbeat_s=7.5, connection_id="conn",
        peers=Peers(host=False, participants=3))


def test_event_encoders_write_exactly_the_contract_json() -> None:
    assert encode_peer_joined("host", "p1") == (
        '{"type":"peer_joined","role":"host","peer_id":"p1"}')
    assert encode_peer_left("participant", "p2", "replaced") == (
        '{"type":"peer_left","role":"participant","peer_id":"p2","reason":"replaced"}')
    assert encode_draining(1500) == '{"type":"draining","reconnect_after_ms":1500}'


def test_events_round_trip_through_parse_server_message() -> None:
    assert parse_server_message(encode_peer_joined("host", "p1")) == PeerJoined("host", "p1")
    assert parse_server_message(encode_peer_left("host", "p1", "closed").encode()) == (
        PeerLeft("host", "p1", "closed"))
    assert parse_server_message(encode_draining(0)) == Draining(0)


def test_parse_server_message_ignores_unknown_fields() -> None:
    text = '{"type":"draining","reconnect_after_ms":5,"why":"upgrade"}'
    assert parse_server_message(text) == Draining(5)


@pytest.mark.parametrize(("data", "detail"), [
    ("nope", "server message is not valid JSON"),
    ("[]", "server message must be a JSON object"),
    ("{}", "server message is missing field `type`"),
    ('{"type":"client_hello"}', "field `type` names no known server message"),
    ('{"type":"' + "Z" * 300 + '"}', "field `type` names no known server message"),
    ('{"type":"draining"}', "server message is missing field `reconnect_after_ms`"),
    ('{"type":"draining","reconnect_after_ms":"soon"}',
     "field `reconnect_after_ms` must be int, not str"),
    ('{"type":"peer_left","role":"host","peer_id":"p"}',
     "server message is missing field `reason`"),
    ('{"type":"server_hello","protocol_version":1,"ack_nonce":"a","server_nonce":"b",'
     '"compression":"none","features":[],"heartbeat_s":15,"connection_id":"c",'
     '"peers":{"host":1,"participants":0}}', "field `peers.host` must be bool, not int"),
])
def test_parse_server_message_refusals(data: str, detail: str) -> None:
    with pytest.raises(HelloError) as info:
        parse_server_message(data)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert info.value.detail.startswith(detail)


@PROPERTY
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_parse_server_message_raises_only_hello_error(data: str | bytes) -> None:
    try:
        parse_server_message(data)
    except HelloError as e:
        assert 0 < len(e.detail) < 160


# --- nonces -----------------------------------------------------------------------------------


def test_new_server_nonce_is_standard_base64_of_16_fresh_bytes() -> None:
    nonces = {new_server_nonce() for _ in range(50)}
    assert len(nonces) == 50
    for nonce in nonces:
        assert re.fullmatch(r"[A-Za-z0-9+/]{22}==", nonce)
        assert len(base64.b64decode(nonce, validate=True)) == 16
        # It is what a client hello must carry, too.
        assert parse_client_hello(json.dumps(hello_dict(client_nonce=nonce))).client_nonce == (
            nonce)
