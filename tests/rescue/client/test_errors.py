"""Close codes map to the typed exceptions the channel raises, or to a reconnect."""

from __future__ import annotations

import pytest

from rescue.client.errors import (
    RECOVERABLE_CLOSES,
    FallbackPaused,
    ProtocolViolation,
    RelayClosed,
    Replaced,
    SessionFull,
    TokenExpired,
    closed_error,
)
from rescue.codes import CloseCode


@pytest.mark.parametrize(("code", "kind"), [
    (CloseCode.REPLACED, Replaced), (CloseCode.SESSION_FULL, SessionFull),
    (CloseCode.GUARDRAIL_TRIPPED, FallbackPaused), (CloseCode.TOKEN_EXPIRED, TokenExpired),
    (CloseCode.PROTOCOL_ERROR, ProtocolViolation), (CloseCode.MESSAGE_TOO_BIG, ProtocolViolation),
    (CloseCode.UNSUPPORTED_DATA, ProtocolViolation), (4999, RelayClosed)])
def test_fatal_closes_become_their_exception(code: int, kind: type[RelayClosed]) -> None:
    error = closed_error(code, "REASON")
    assert type(error) is kind
    assert (error.code, error.reason) == (code, "REASON")
    assert str(code) in str(error)


def test_every_close_code_is_either_recoverable_or_fatal_never_both() -> None:
    for code in CloseCode:
        fatal = type(closed_error(code, code.reason)) is not RelayClosed
        assert not (fatal and code in RECOVERABLE_CLOSES), code
    assert CloseCode.SERVER_SHUTDOWN in RECOVERABLE_CLOSES
    assert CloseCode.TRY_AGAIN_LATER in RECOVERABLE_CLOSES
    assert CloseCode.REPLACED not in RECOVERABLE_CLOSES
