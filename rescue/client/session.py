"""Open a channel to the other peer the way a Beach client does: WebRTC first, the relay last.

:func:`open_session` wires the fallback controller (:func:`rescue.client.fallback.establish`)
with the real rungs:

- **primary**: :func:`~rescue.client.webrtc.open_webrtc` over the caller's signalling, once
  per attempt of the ladder;
- **TURN**: the same with ``turn_ice_servers`` and relay candidates only, when given;
- **guardrail**: one grant from the token source (the control plane's ``POST
  /v1/fallback/token``); its answer is the guardrail's verdict, and the grant it returns is
  the one the fallback channel connects with, so asking never mints a second token;
- **fallback**: an end-to-end encrypted :class:`~rescue.client.channel.Channel` through
  beach-rescue, returned only once it is connected to the relay.

The returned channel's ``transport`` says which rung carries it; the ladder's
``transport.fallback.considered`` and ``transport.fallback.activated`` events go to the
``rescue.client`` log and to ``on_event``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from rescue.client.channel import ChannelEvent, ChannelOptions, Role, connect
from rescue.client.errors import ChannelError, FallbackPaused
from rescue.client.fallback import establish
from rescue.client.grants import ControlPlaneError, ControlPlaneTokens, Grant, TokenSource
from rescue.client.ladder import GuardrailAnswer, LadderEvent, LadderPolicy
from rescue.client.transport import MessageChannel, TransportKind
from rescue.client.webrtc import IceServer, Signalling, open_webrtc
from rescue.logs import log_event

__all__ = ["guardrail_answer", "open_session"]

logger = logging.getLogger(__name__)


def guardrail_answer(error: BaseException) -> GuardrailAnswer:
    """The guardrail's verdict when asking the token source for a grant raised ``error``.

    The kill switch (:class:`FallbackPaused`) is ``PAUSED``; a refusal by the control plane
    (a 4xx other than 429) is ``DENIED``; no usable answer (a connection error, a timeout,
    a 5xx, 429, a malformed answer) is ``UNREACHABLE``. Anything else is re-raised.
    """
    if isinstance(error, FallbackPaused):
        return GuardrailAnswer.PAUSED
    if isinstance(error, ControlPlaneError):
        refused = 400 <= error.status < 500 and error.status != 429
        return GuardrailAnswer.DENIED if refused else GuardrailAnswer.UNREACHABLE
    if isinstance(error, (aiohttp.ClientError, OSError, TimeoutError)):
        return GuardrailAnswer.UNREACHABLE
    raise error


@dataclass
class _PrimedTokens:
    """A token source that first hands out the grant the guardrail fetched, then its source's."""

    source: TokenSource
    primed: Grant | None = None

    async def prime(self) -> None:
        """Fetch the grant the first connection will use (raises what the source raises)."""
        self.primed = await self.source.grant()

    async def grant(self, *, fresh: bool = False) -> Grant:
        """The primed grant once (unless ``fresh``), then whatever the source gives."""
        primed, self.primed = self.primed, None
        if primed is not None and not fresh:
            return primed
        return await self.source.grant(fresh=fresh)


async def open_session(*, session_id: str, role: Role, psk: bytes, signalling: Signalling,
                       policy: LadderPolicy, tokens: ControlPlaneTokens | TokenSource,
                       relay_url: str | None = None, ice_servers: Sequence[IceServer] = (),
                       turn_ice_servers: Sequence[IceServer] | None = None,
                       options: ChannelOptions | None = None,
                       on_event: Callable[[LadderEvent], None] | None = None,
                       on_channel_event: Callable[[ChannelEvent], None] | None = None,
                       webrtc_timeout_s: float = 10.0) -> MessageChannel:
    """A channel to the other peer from the lowest rung of the ladder that works.

    Every primary attempt (and the TURN attempt) calls ``open_webrtc`` on the same
    ``signalling`` object: it must carry one fresh offer/answer exchange per attempt and
    must not deliver a message of an earlier, failed attempt to a later one (tag messages
    with the attempt, or drop what arrives between attempts). Each attempt gets
    ``webrtc_timeout_s`` seconds. ``turn_ice_servers`` adds the TURN rung and must be given
    exactly when ``policy.turn_configured`` is set (ValueError otherwise).

    The fallback is used only after every attempt failed, the policy's feature flag is on
    and the guardrail (a grant from ``tokens``) allows it; it connects to the grant's
    ``relay_url`` when it names one, else to ``relay_url``. ``options`` and
    ``on_channel_event`` go to the fallback :class:`~rescue.client.channel.Channel`; the
    PSK is used by that channel only (WebRTC is protected by DTLS). Raises
    :class:`~rescue.client.fallback.FallbackUnavailable` (with its reason codes) when no
    rung works.
    """
    if policy.turn_configured != bool(turn_ice_servers):
        raise ValueError("give turn_ice_servers exactly when policy.turn_configured is set")
    primed = _PrimedTokens(tokens)

    async def primary(attempt: int) -> MessageChannel:
        return await open_webrtc(role, signalling, ice_servers=ice_servers,
                                 timeout_s=webrtc_timeout_s)

    async def turn() -> MessageChannel:
        return await open_webrtc(role, signalling, ice_servers=turn_ice_servers or (),
                                 timeout_s=webrtc_timeout_s, transport=TransportKind.TURN)

    async def guardrail() -> GuardrailAnswer:
        try:
            await primed.prime()
        except Exception as e:
            answer = guardrail_answer(e)
            log_event(logger, "transport.guardrail.refused", session_id=session_id,
                      answer=answer.value, error=str(e))
            return answer
        return GuardrailAnswer.ALLOWED

    async def fallback() -> MessageChannel:
        if relay_url is None and (primed.primed is None or primed.primed.relay_url is None):
            raise ChannelError("no relay URL: pass relay_url or use a token source whose "
                               "grants name the relay")
        channel = connect(relay_url, session_id=session_id, role=role, psk=psk, tokens=primed,
                          options=options, on_event=on_channel_event)
        await channel.start()  # raises (and leaves nothing open) when it cannot connect
        return channel

    return await establish(session_id=session_id, policy=policy, primary=primary,
                           turn=turn if turn_ice_servers else None, fallback=fallback,
                           guardrail=guardrail, on_event=on_event)
