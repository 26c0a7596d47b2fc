"""Tests for rescue.wshandshake: the server side of the RFC 6455 opening handshake."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from rescue.codes import ErrorCode, Refusal
from rescue.wshandshake import (
    VERSION,
    VersionRefused,
    accept_value,
    check_upgrade,
    switching_protocols,
)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example nonce
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade_headers(**overrides: str | None) -> CIMultiDict[str]:
    """A valid upgrade request's headers; an override of None removes that header."""
    headers = {
        "Host": "relay.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": RFC_KEY,
    }
    for python_name, value in overrides.items():
        name = python_name.replace("_", "-")
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    return CIMultiDict(headers)


def refusal_of(method: str, headers: CIMultiDict[str]) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check_upgrade(method, headers)
    refusal = caught.value
    assert refusal.error is ErrorCode.BAD_REQUEST
    assert (refusal.error.status, refusal.error.code) == (400, "bad_request")
    return refusal


# --- accept_value -------------------------------------------------------------------------

def test_accept_value_matches_the_rfc_example() -> None:
    assert accept_value(RFC_KEY) == RFC_ACCEPT


# --- check_upgrade: accepted --------------------------------------------------------------

def test_a_valid_request_is_accepted_with_the_rfc_accept_value() -> None:
    assert check_upgrade("GET", upgrade_headers()) == RFC_ACCEPT


def test_header_names_and_token_values_are_case_insensitive() -> None:
    headers = CIMultiDict({
        "upgrade": "WebSocket",
        "CONNECTION": "UPGRADE",
        "sec-websocket-version": "13",
        "SEC-WEBSOCKET-KEY": RFC_KEY,
    })
    assert check_upgrade("GET", headers) == RFC_ACCEPT


def test_connection_with_several_tokens_including_upgrade_is_accepted() -> None:
    headers = upgrade_headers(Connection="keep-alive, Upgrade")
    assert check_upgrade("GET", headers) == RFC_ACCEPT


def test_whitespace_around_values_is_ignored() -> None:
    headers = upgrade_headers(Upgrade=" websocket ", Sec_WebSocket_Version=" 13 ",
                              Sec_WebSocket_Key=f" {RFC_KEY} ")
    assert check_upgrade("GET", headers) == RFC_ACCEPT


# --- check_upgrade: refused ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "HEAD", "get", "CONNECT"])
def test_a_method_other_than_get_is_refused(method: str) -> None:
    refusal = refusal_of(method, upgrade_headers())
    assert "GET" in refusal.detail
    assert not isinstance(refusal, VersionRefused)


@pytest.mark.parametrize("upgrade", [None, "", "h2c", "websockets", "web socket"])
def test_a_missing_or_wrong_upgrade_header_is_refused(upgrade: str | None) -> None:
    refusal = refusal_of("GET", upgrade_headers(Upgrade=upgrade))
    assert "Upgrade" in refusal.detail
    assert "websocket" in refusal.detail


@pytest.mark.parametrize("connection", [None, "", "keep-alive", "close", "upgrades"])
def test_a_connection_header_without_upgrade_is_refused(connection: str | None) -> None:
    refusal = refusal_of("GET", upgrade_headers(Connection=connection))
    assert "Connection" in refusal.detail


@pytest.mark.parametrize("version", ["8", "99", "", None, "12", "13, 8"])
def test_a_version_other_than_13_is_refused_as_version_refused(version: str | None) -> None:
    refusal = refusal_of("GET", upgrade_headers(Sec_WebSocket_Version=version))
    assert isinstance(refusal, VersionRefused)
    assert "Sec-WebSocket-Version" in refusal.detail
    assert VERSION == "13"
    assert "13" in refusal.detail  # it says which version to use


def test_a_long_bad_version_is_cut_in_the_detail() -> None:
    refusal = refusal_of("GET", upgrade_headers(Sec_WebSocket_Version="9" * 1000))
    assert isinstance(refusal, VersionRefused)
    assert len(refusal.detail) < 100


@pytest.mark.parametrize("key", [
    None,                                             # missing
    "",                                               # empty
    "not base64 at all!!",                            # not base64
    "dGhlIHNhbXBsZSBub25jZQ",                         # 16 bytes but no padding
    "dGhlIHNh bXBsZSBub25jZQ==",                      # a space inside
    base64.b64encode(bytes(15)).decode(),             # 15 bytes
    base64.b64encode(bytes(17)).decode(),             # 17 bytes
    "\u00e9" * 24,                                    # not ASCII
])
def test_a_missing_or_malformed_key_is_refused(key: str | None) -> None:
    refusal = refusal_of("GET", upgrade_headers(Sec_WebSocket_Key=key))
    assert not isinstance(refusal, VersionRefused)
    assert "Sec-WebSocket-Key" in refusal.detail


def test_the_method_is_checked_before_the_headers() -> None:
    refusal = refusal_of("POST", CIMultiDict())
    assert "GET" in refusal.detail


# --- switching_protocols ------------------------------------------------------------------

def test_switching_protocols_is_a_well_formed_101() -> None:
    response = switching_protocols(RFC_ACCEPT)
    assert response.endswith(b"\r\n\r\n")
    head = response[: -len(b"\r\n\r\n")]
    assert b"\r\n\r\n" not in head
    status, *lines = head.decode("ascii").split("\r\n")
    assert status == "HTTP/1.1 101 Switching Protocols"
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, sep, value = line.partition(":")
        assert sep and name == name.strip() and name, line
        headers.add(name, value.strip())
    assert len(headers) == 3
    assert headers["Upgrade"].lower() == "websocket"
    assert headers["Connection"].lower() == "upgrade"
    assert headers["Sec-WebSocket-Accept"] == RFC_ACCEPT


# --- properties ---------------------------------------------------------------------------

@given(st.binary(min_size=16, max_size=16))
def test_any_16_byte_key_is_accepted_with_the_sha1_accept(nonce: bytes) -> None:
    key = base64.b64encode(nonce).decode("ascii")
    expected = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()
    assert check_upgrade("GET", upgrade_headers(Sec_WebSocket_Key=key)) == expected
    assert accept_value(key) == expected


@given(st.binary(max_size=64).filter(lambda b: len(b) != 16))
def test_a_key_of_any_other_length_is_refused(nonce: bytes) -> None:
    key = base64.b64encode(nonce).decode("ascii")
    refusal = refusal_of("GET", upgrade_headers(Sec_WebSocket_Key=key))
    assert "Sec-WebSocket-Key" in refusal.detail


@pytest.mark.parametrize("extra", [{"Content_Length": "5"}, {"Transfer_Encoding": "chunked"}])
def test_an_upgrade_request_with_a_body_is_refused(extra: dict[str, str]) -> None:
    # the HTTP parser would take the frames that follow as the request's body
    refusal = refusal_of("GET", upgrade_headers(**extra))
    assert refusal.error is ErrorCode.BAD_REQUEST
    assert "no body" in refusal.detail


def test_an_upgrade_request_with_content_length_zero_is_accepted() -> None:
    assert check_upgrade("GET", upgrade_headers(Content_Length="0")) == accept_value(RFC_KEY)
