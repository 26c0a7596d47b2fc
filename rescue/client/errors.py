"""What can go wrong in a client channel, as a small exception hierarchy.

Integrity failures (the relay or the network altered, dropped or replayed a frame) are
distinct from refusals by the relay (a close code or an HTTP error) so an application can
tell an attack or a bug from a policy answer. :func:`closed_error` maps a close code to
the exception a channel raises when it will not reconnect.
"""

from __future__ import annotations

from rescue.codes import CloseCode


class ChannelError(Exception):
    """Base of every error a client channel raises."""


class IntegrityError(ChannelError):
    """A frame failed authentication or broke the stream's order: never silently accepted."""


class ReplayError(IntegrityError):
    """A frame with an already delivered seq arrived outside an announced resend."""


class GapError(IntegrityError):
    """Frames are missing from a stream while no reconnect explains it."""


class HandshakeError(ChannelError):
    """The end-to-end key exchange with a peer failed."""


class WrongPskError(HandshakeError):
    """The peer does not share this session's pre-shared secret."""


class NegotiationError(HandshakeError):
    """The peers have no cipher suite in common."""


class RelayRefused(ChannelError):
    """The relay refused the connection before the upgrade (an HTTP error body)."""

    def __init__(self, status: int, error: str, detail: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"relay refused: {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s


class RelayClosed(ChannelError):
    """The relay closed the connection with a close code the channel does not recover from."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"relay closed the connection: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class Replaced(RelayClosed):
    """Another connection of the same peer took this one's place (4004)."""


class SessionFull(RelayClosed):
    """The session already has its host or its maximum of participants (4003)."""


class FallbackPaused(RelayClosed):
    """The operator's kill switch stops fallback connections (4008 or 403 fallback_paused)."""


class TokenExpired(RelayClosed):
    """The token expired and no token provider can fetch a new one (4009 or 401)."""


class ProtocolViolation(RelayClosed):
    """The relay says this client broke the protocol (4000, 1003, 1009): a client bug."""


class ReconnectFailed(ChannelError):
    """The channel could not reconnect within its give-up time; the last cause is chained."""


_FATAL: dict[int, type[RelayClosed]] = {
    CloseCode.REPLACED: Replaced,
    CloseCode.SESSION_FULL: SessionFull,
    CloseCode.GUARDRAIL_TRIPPED: FallbackPaused,
    CloseCode.TOKEN_EXPIRED: TokenExpired,
    CloseCode.PROTOCOL_ERROR: ProtocolViolation,
    CloseCode.UNSUPPORTED_DATA: ProtocolViolation,
    CloseCode.MESSAGE_TOO_BIG: ProtocolViolation,
    CloseCode.SESSION_MISMATCH: ProtocolViolation,
    CloseCode.HANDSHAKE_TIMEOUT: ProtocolViolation,
}

#: Close codes after which the channel reconnects (restart, overload, transient faults).
RECOVERABLE_CLOSES = frozenset({
    CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.INTERNAL_ERROR,
    CloseCode.SERVER_SHUTDOWN, CloseCode.TRY_AGAIN_LATER, CloseCode.SLOW_CONSUMER,
    CloseCode.IDLE_TIMEOUT, CloseCode.RATE_LIMITED,
})


def closed_error(code: int, reason: str) -> RelayClosed:
    """The typed exception for a close the channel does not recover from."""
    return _FATAL.get(code, RelayClosed)(code, reason)
