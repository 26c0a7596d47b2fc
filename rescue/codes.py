"""The contract's vocabulary of refusals: WebSocket close codes and HTTP error codes.

Close codes are what the relay sends when it ends a WebSocket; each has the fixed reason
string of the protocol (section 6). HTTP errors are what it answers before the upgrade:
a status, a machine-readable ``error`` code and a human ``detail``.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes of protocol v1; ``reason`` is the string sent with each."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVER_SHUTDOWN = 1012
    TRY_AGAIN_LATER = 1013
    PROTOCOL_ERROR = 4000
    HANDSHAKE_TIMEOUT = 4001
    SESSION_MISMATCH = 4002
    SESSION_FULL = 4003
    REPLACED = 4004
    SLOW_CONSUMER = 4005
    IDLE_TIMEOUT = 4006
    RATE_LIMITED = 4007
    GUARDRAIL_TRIPPED = 4008
    TOKEN_EXPIRED = 4009

    @property
    def reason(self) -> str:
        """The reason string sent in the close frame (the member's name)."""
        return self.name


class ErrorCode(enum.Enum):
    """HTTP refusals before the upgrade: ``value`` is ``(status, error code)``."""

    BAD_REQUEST = (400, "bad_request")
    TOKEN_MISSING = (401, "token_missing")
    TOKEN_INVALID = (401, "token_invalid")
    TOKEN_EXPIRED = (401, "token_expired")
    NOT_ENTITLED = (403, "not_entitled")
    SESSION_MISMATCH = (403, "session_mismatch")
    FALLBACK_PAUSED = (403, "fallback_paused")
    NOT_FOUND = (404, "not_found")
    METHOD_NOT_ALLOWED = (405, "method_not_allowed")
    UPGRADE_REQUIRED = (426, "upgrade_required")
    RATE_LIMITED = (429, "rate_limited")
    DRAINING = (503, "draining")
    OVERLOADED = (503, "overloaded")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str:
        return self.value[1]


class Refusal(Exception):
    """Raised by sans-I/O checks to refuse a request before the upgrade."""

    def __init__(self, error: ErrorCode, detail: str, retry_after_s: int | None = None):
        super().__init__(f"{error.code}: {detail}")
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s
