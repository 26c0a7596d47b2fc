"""Tests for rescue.codes against the tables of the wire contract (protocol v1)."""

from __future__ import annotations

import pytest

from rescue.codes import CloseCode, ErrorCode, Refusal

# Protocol v1, section 6, copied by hand: code -> reason string.
CONTRACT_CLOSE_CODES = {
    1000: "NORMAL",
    1001: "GOING_AWAY",
    1003: "UNSUPPORTED_DATA",
    1009: "MESSAGE_TOO_BIG",
    1011: "INTERNAL_ERROR",
    1012: "SERVER_SHUTDOWN",
    1013: "TRY_AGAIN_LATER",
    4000: "PROTOCOL_ERROR",
    4001: "HANDSHAKE_TIMEOUT",
    4002: "SESSION_MISMATCH",
    4003: "SESSION_FULL",
    4004: "REPLACED",
    4005: "SLOW_CONSUMER",
    4006: "IDLE_TIMEOUT",
    4007: "RATE_LIMITED",
    4008: "GUARDRAIL_TRIPPED",
    4009: "TOKEN_EXPIRED",
}

# Protocol v1, section 3: error code -> HTTP status of the refusals before the upgrade.
CONTRACT_HTTP_ERRORS = {
    "bad_request": 400,
    "token_missing": 401,
    "token_invalid": 401,
    "token_expired": 401,
    "not_entitled": 403,
    "session_mismatch": 403,
    "fallback_paused": 403,
    "rate_limited": 429,
    "draining": 503,
    "overloaded": 503,
}

# Refinements the relay adds for requests outside the contract (documented in docs/protocol.md).
REFINEMENT_HTTP_ERRORS = {
    "not_found": 404,
    "method_not_allowed": 405,
    "upgrade_required": 426,
}


def test_close_codes_match_the_contract_table_exactly() -> None:
    assert {int(c): c.reason for c in CloseCode} == CONTRACT_CLOSE_CODES


@pytest.mark.parametrize("code", list(CloseCode))
def test_close_reason_is_the_member_name(code: CloseCode) -> None:
    assert code.reason == code.name
    assert code.reason.isupper()
    assert len(code.reason.encode()) <= 123  # fits a close frame's control payload


def test_close_codes_are_in_the_allowed_ranges() -> None:
    for code in CloseCode:
        # RFC 6455 7.4: 1000-2999 registered, 4000-4999 private use; 1005/1006/1015 never sent.
        assert 1000 <= code <= 2999 or 4000 <= code <= 4999
        assert code not in (1004, 1005, 1006, 1015)


def test_close_code_is_an_int_for_the_wire() -> None:
    assert int(CloseCode.REPLACED) == 4004
    assert CloseCode(4003) is CloseCode.SESSION_FULL
    assert isinstance(CloseCode.NORMAL, int)


def test_http_errors_of_the_contract_have_their_statuses() -> None:
    table = {e.code: e.status for e in ErrorCode}
    for code, status in CONTRACT_HTTP_ERRORS.items():
        assert table.get(code) == status, code


def test_no_http_error_beyond_the_contract_and_its_documented_refinements() -> None:
    table = {e.code: e.status for e in ErrorCode}
    assert table == CONTRACT_HTTP_ERRORS | REFINEMENT_HTTP_ERRORS


@pytest.mark.parametrize("error", list(ErrorCode))
def test_error_member_name_is_its_code_in_upper_case(error: ErrorCode) -> None:
    assert error.name == error.code.upper()
    assert error.value == (error.status, error.code)
    assert 400 <= error.status <= 599


def test_error_codes_are_unique() -> None:
    codes = [e.code for e in ErrorCode]
    assert len(codes) == len(set(codes))


def test_refusal_carries_error_detail_and_retry_after() -> None:
    r = Refusal(ErrorCode.OVERLOADED, "connection limit reached", retry_after_s=5)
    assert r.error is ErrorCode.OVERLOADED
    assert r.detail == "connection limit reached"
    assert r.retry_after_s == 5
    assert str(r) == "overloaded: connection limit reached"
    plain = Refusal(ErrorCode.TOKEN_MISSING, "no token")
    assert plain.retry_after_s is None
    with pytest.raises(Refusal):
        raise plain
