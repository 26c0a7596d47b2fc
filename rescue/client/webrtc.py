"""The primary rung: a WebRTC data channel between two peers, through aiortc.

:func:`open_webrtc` connects a host and a participant over one ordered, reliable data
channel and returns it as a :class:`~rescue.client.transport.MessageChannel`. The host
offers, the participant answers; the two session descriptions travel over a
:class:`Signalling` hook the application provides (its own signalling server, or
:func:`signalling_pair` inside one process). ICE is not trickled: a description is sent
once its candidates are gathered, so signalling is exactly one offer and one answer,
``{"type": "offer" | "answer", "sdp": <SDP text>}``.

Failure to connect raises :class:`PrimaryFailed` with a :class:`~rescue.client.ladder.Reason`
the escalation ladder understands (``no_answer``, ``ice_failed``, ``primary_timeout``,
...) after closing the peer connection. A TURN attempt is the same call with
``transport=TransportKind.TURN``: it uses relay candidates only, so it really goes
through the TURN server.

aiortc is an optional dependency (``beach-rescue[webrtc]``), imported only when a
connection is opened, so the rest of the client works without it.

Limits: aiortc cannot pause a data channel's reads, so received messages wait in an
unbounded queue until the application takes them; a message may be at most the peer's
maximum message size (256 KiB between two aiortc peers; ``send`` raises ValueError above).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from rescue.client.errors import ChannelError
from rescue.client.ladder import Reason
from rescue.client.transport import TransportKind

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

__all__ = [
    "ChannelClosed",
    "IceServer",
    "PrimaryFailed",
    "QueueSignalling",
    "Signalling",
    "WebRtcChannel",
    "open_webrtc",
    "signalling_pair",
]

logger = logging.getLogger(__name__)

EXTRA = "beach-rescue[webrtc]"
CHANNEL_LABEL = "beach"
#: ``send`` waits while more than this many bytes are queued on the data channel ...
HIGH_WATER = 256 * 1024
#: ... until the queue drains to this many (the channel's bufferedAmountLowThreshold).
LOW_WATER = 64 * 1024
#: How long ``close`` waits for queued messages to reach the peer before it cuts the line.
CLOSE_TIMEOUT_S = 5.0


class PrimaryFailed(ChannelError):
    """A WebRTC (or TURN) attempt did not produce a channel; ``reason`` says why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ChannelClosed(ChannelError):
    """The data channel is closed: ``send`` after a close, or the connection was lost."""


class Signalling(Protocol):
    """How the two peers exchange their session descriptions (the application's hook)."""

    async def send(self, message: dict[str, str]) -> None:
        """Deliver ``message`` to the other peer."""
        ...

    async def receive(self) -> dict[str, str]:
        """The next message from the other peer (waits for it)."""
        ...


class QueueSignalling:
    """One end of an in-process signalling pair: sends to one queue, receives from another."""

    def __init__(self, inbox: asyncio.Queue[dict[str, str]],
                 outbox: asyncio.Queue[dict[str, str]]) -> None:
        self._inbox = inbox
        self._outbox = outbox

    async def send(self, message: dict[str, str]) -> None:
        """Put a copy of ``message`` in the other end's inbox."""
        await self._outbox.put(dict(message))

    async def receive(self) -> dict[str, str]:
        """Take the next message from this end's inbox (waits for one)."""
        return await self._inbox.get()


def signalling_pair() -> tuple[QueueSignalling, QueueSignalling]:
    """Two connected in-process signalling ends, e.g. (host's, participant's)."""
    a: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    b: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    return QueueSignalling(a, b), QueueSignalling(b, a)


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server (``stun:host:port``, ``turn:host:port?transport=udp``, ...)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)

    @property
    def is_turn(self) -> bool:
        """Whether one of the URLs names a TURN server."""
        return any(url.startswith(("turn:", "turns:")) for url in self.urls)


def _require_aiortc() -> None:
    try:
        importlib.import_module("aiortc")
    except ImportError as e:
        raise ImportError(f"the WebRTC transport needs aiortc: pip install '{EXTRA}'") from e


class WebRtcChannel:
    """An open WebRTC data channel as a MessageChannel; made by :func:`open_webrtc`.

    Iterating yields the peer's messages in order and stops when the data channel closes
    in order (either side called ``close``); it raises :class:`ChannelClosed` after the
    last message if the connection failed instead (ICE consent lost, DTLS failure).
    """

    def __init__(self, pc: RTCPeerConnection, transport: TransportKind) -> None:
        self._pc = pc
        self._transport = transport
        self._dc: RTCDataChannel | None = None
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._drained = asyncio.Event()    # bufferedAmount fell to LOW_WATER (or closed)
        self._dc_closed = asyncio.Event()
        self._settled = asyncio.Event()    # while opening: open, or failed (_failure)
        self._failure: PrimaryFailed | None = None
        self._ended = False                # the inbox got its end marker
        self._lost = False                 # the connection failed after opening
        self._eof = False                  # the iterator reached the end marker
        self._closing = False
        self._closed = asyncio.Event()
        pc.on("connectionstatechange", self._on_connection_state)

    @property
    def transport(self) -> TransportKind:
        """WEBRTC for a direct channel, TURN for a relayed one."""
        return self._transport

    @property
    def buffered_amount(self) -> int:
        """Bytes given to ``send`` that the data channel has not yet passed to SCTP."""
        return 0 if self._dc is None else self._dc.bufferedAmount

    async def send(self, data: bytes) -> None:
        """Queue ``data`` for the peer; waits while over HIGH_WATER bytes are queued.

        Raises :class:`ChannelClosed` once the channel is closed (also while waiting),
        ValueError for a message over the peer's maximum message size.
        """
        dc = self._dc
        while True:
            if dc is None or self._closing or self._ended or dc.readyState != "open":
                raise ChannelClosed("the WebRTC data channel is closed")
            if dc.bufferedAmount <= HIGH_WATER:
                break
            self._drained.clear()
            await self._drained.wait()
        dc.send(bytes(data))

    def __aiter__(self) -> WebRtcChannel:
        """The channel is its own iterator over the peer's messages."""
        return self

    async def __anext__(self) -> bytes:
        """The next message from the peer; see the class docstring for how it ends."""
        if not self._eof:
            message = await self._inbox.get()
            if message is not None:
                return message
            self._eof = True
        if self._lost:
            raise ChannelClosed("the WebRTC connection failed")
        raise StopAsyncIteration

    async def close(self) -> None:
        """Close the data channel after its queued messages, then the peer connection.

        Waits at most CLOSE_TIMEOUT_S for the peer to take the queued messages.
        Idempotent; concurrent callers all return once the connection is closed.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            dc = self._dc
            if dc is not None and dc.readyState == "open" \
                    and self._pc.connectionState == "connected":
                dc.close()  # a stream reset, sent after the messages still queued
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._dc_closed.wait()
            await self._pc.close()
        finally:
            self._end(lost=False)
            self._closed.set()

    # -- opening -----------------------------------------------------------------------

    def _attach(self, dc: RTCDataChannel) -> None:
        """Adopt ``dc`` (the host's own, or the first the host opened) and watch it."""
        if self._dc is not None:
            dc.close()  # only one channel per connection
            return
        self._dc = dc
        dc.bufferedAmountLowThreshold = LOW_WATER
        dc.on("message", self._on_message)
        dc.on("bufferedamountlow", self._drained.set)
        dc.on("close", self._on_dc_close)
        if dc.readyState == "open":
            self._settled.set()
        else:
            dc.on("open", self._settled.set)

    async def _wait_open(self) -> None:
        await self._settled.wait()
        if self._failure is not None:
            raise self._failure

    # -- aiortc callbacks ----------------------------------------------------------------

    def _on_message(self, message: bytes | str) -> None:
        if not self._ended:
            self._inbox.put_nowait(message.encode() if isinstance(message, str) else message)

    def _on_dc_close(self) -> None:
        self._dc_closed.set()
        self._end(lost=False)

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        if state not in ("failed", "closed"):
            return
        if not self._settled.is_set():  # still opening
            if self._pc.iceConnectionState == "failed":
                self._failure = PrimaryFailed(Reason.ICE_FAILED, "ICE connectivity checks failed")
            else:
                self._failure = PrimaryFailed(Reason.CONNECTION_FAILED,
                                              f"peer connection {state} while opening")
            self._settled.set()
        self._end(lost=state == "failed" and not self._closing)

    def _end(self, *, lost: bool) -> None:
        self._drained.set()  # wake senders: they will see the channel closed
        if not self._ended:
            self._ended = True
            self._lost = lost
            self._inbox.put_nowait(None)


async def _signal(signalling: Signalling, message: dict[str, str]) -> None:
    try:
        await signalling.send(message)
    except Exception as e:
        raise PrimaryFailed(Reason.SIGNALLING_FAILED, f"sending the {message['type']} failed: "
                            f"{e!r}") from e


async def _expect(signalling: Signalling, kind: str) -> str:
    """The SDP of the next signalling message, which must be of type ``kind``."""
    try:
        message = await signalling.receive()
    except Exception as e:
        raise PrimaryFailed(Reason.SIGNALLING_FAILED,
                            f"receiving the {kind} failed: {e!r}") from e
    if not isinstance(message, dict) or message.get("type") != kind \
            or not isinstance(message.get("sdp"), str):
        got = message.get("type") if isinstance(message, dict) else message
        raise PrimaryFailed(Reason.SIGNALLING_FAILED,
                            f"expected an {kind}, got {str(got)[:40]!r}")
    return message["sdp"]


class _Phase:
    """Where an opening stands, to name the reason when its time runs out."""

    def __init__(self) -> None:
        self.have_remote = False

    def timeout_reason(self, pc: RTCPeerConnection) -> Reason:
        if not self.have_remote:
            return Reason.NO_ANSWER
        if pc.iceConnectionState == "failed":
            return Reason.ICE_FAILED
        return Reason.PRIMARY_TIMEOUT


async def _set_remote(pc: RTCPeerConnection, sdp: str, kind: str, phase: _Phase) -> None:
    from aiortc import RTCSessionDescription  # noqa: PLC0415 - optional dependency
    from aiortc.exceptions import (  # noqa: PLC0415
        InvalidAccessError,
        InvalidStateError,
        OperationError,
    )
    phase.have_remote = True
    if not any(line.startswith("m=application ") for line in sdp.splitlines()):
        raise PrimaryFailed(Reason.SIGNALLING_FAILED, f"the {kind} offers no data channel")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
    except (ValueError, InvalidAccessError, InvalidStateError, OperationError) as e:
        raise PrimaryFailed(Reason.SIGNALLING_FAILED, f"unusable {kind}: {e!r}") from e


async def _offer(pc: RTCPeerConnection, channel: WebRtcChannel,
                 signalling: Signalling, phase: _Phase) -> None:
    channel._attach(pc.createDataChannel(CHANNEL_LABEL, ordered=True))
    await pc.setLocalDescription(await pc.createOffer())  # gathers the candidates
    await _signal(signalling, {"type": "offer", "sdp": pc.localDescription.sdp})
    await _set_remote(pc, await _expect(signalling, "answer"), "answer", phase)
    await channel._wait_open()


async def _answer(pc: RTCPeerConnection, channel: WebRtcChannel,
                  signalling: Signalling, phase: _Phase) -> None:
    pc.on("datachannel", channel._attach)
    await _set_remote(pc, await _expect(signalling, "offer"), "offer", phase)
    await pc.setLocalDescription(await pc.createAnswer())
    await _signal(signalling, {"type": "answer", "sdp": pc.localDescription.sdp})
    await channel._wait_open()


async def open_webrtc(role: Literal["host", "participant"], signalling: Signalling, *,
                      ice_servers: Sequence[IceServer] = (), timeout_s: float = 10.0,
                      transport: TransportKind = TransportKind.WEBRTC) -> WebRtcChannel:
    """Connect to the other peer over a WebRTC data channel within ``timeout_s`` seconds.

    The host offers and creates the one ordered, reliable data channel; the participant
    answers. With ``transport=TURN`` only relay candidates are used (``ice_servers`` must
    name a TURN server). Raises :class:`PrimaryFailed` (no_answer, ice_failed,
    primary_timeout, signalling_failed, connection_failed) after closing the connection,
    ImportError naming ``beach-rescue[webrtc]`` if aiortc is missing, ValueError for bad
    arguments. No STUN server is used unless ``ice_servers`` names one.
    """
    if role not in ("host", "participant"):
        raise ValueError(f"role must be 'host' or 'participant', not {role!r}")
    if transport is TransportKind.WEBSOCKET_FALLBACK:
        raise ValueError("open_webrtc opens WEBRTC or TURN channels only")
    if transport is TransportKind.TURN and not any(s.is_turn for s in ice_servers):
        raise ValueError("a TURN attempt needs a turn: or turns: URL in ice_servers")
    if not timeout_s > 0:
        raise ValueError("timeout_s must be positive")
    _require_aiortc()
    from aiortc import (  # noqa: PLC0415 - optional dependency
        RTCConfiguration,
        RTCIceServer,
        RTCIceTransportPolicy,
        RTCPeerConnection,
    )

    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=list(s.urls), username=s.username,
                                 credential=s.credential) for s in ice_servers],
        iceTransportPolicy=(RTCIceTransportPolicy.RELAY if transport is TransportKind.TURN
                            else RTCIceTransportPolicy.ALL))
    pc = RTCPeerConnection(config)
    channel = WebRtcChannel(pc, transport)
    phase = _Phase()
    opening = _offer if role == "host" else _answer
    try:
        async with asyncio.timeout(timeout_s):
            await opening(pc, channel, signalling, phase)
    except TimeoutError as e:
        reason = phase.timeout_reason(pc)
        await pc.close()
        raise PrimaryFailed(reason, f"no {transport.value} channel within {timeout_s:g} s") from e
    except BaseException:
        await pc.close()
        raise
    logger.debug("webrtc channel open (%s, %s)", role, transport.value)
    return channel
