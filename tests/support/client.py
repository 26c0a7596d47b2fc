"""A small protocol-v1 test peer over aiohttp's client, for integration tests."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rescue.frames import Frame, Kind, decode_frame, encode_frame

RECEIVE_TIMEOUT_S = 10.0


class UnexpectedMessage(AssertionError):
    """The peer received something other than what the test waited for."""


@dataclass
class TestPeer:
    """One connected peer: send frames, receive frames, events and the close."""

    __test__ = False  # not a pytest test class

    ws: aiohttp.ClientWebSocketResponse
    session_id: str
    role: str
    peer_id: str
    server_hello: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0

    async def send_frame(self, payload: bytes, kind: Kind = Kind.DATA) -> int:
        """Send one frame with the next seq; return the seq used."""
        self.seq += 1
        await self.ws.send_bytes(encode_frame(kind, self.seq, payload))
        return self.seq

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv_frame(self, timeout: float = RECEIVE_TIMEOUT_S) -> Frame:  # noqa: ASYNC109
        """Return the next binary frame, collecting text events met on the way."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type is aiohttp.WSMsgType.BINARY:
                return decode_frame(msg.data)
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))
                continue
            raise UnexpectedMessage(f"expected a frame, got {msg.type!r} {msg.data!r} "
                                    f"{msg.extra!r}")

    async def recv_event(self, timeout: float = RECEIVE_TIMEOUT_S) -> dict[str, Any]:  # noqa: ASYNC109
        """Return the next text event (earlier collected ones first)."""
        if self.events:
            return self.events.pop(0)
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            event: dict[str, Any] = json.loads(msg.data)
            return event
        raise UnexpectedMessage(f"expected an event, got {msg.type!r} {msg.data!r}")

    async def recv_close(self, timeout: float = RECEIVE_TIMEOUT_S) -> tuple[int, str]:  # noqa: ASYNC109
        """Skip frames and events until the close; return (code, reason)."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.ERROR):
                code = self.ws.close_code
                return (code if code is not None else -1), ""
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))

    async def close(self) -> None:
        await self.ws.close()


def client_hello(session_id: str, role: str, peer_id: str, **overrides: Any) -> str:
    """The JSON text of a valid client_hello, with fields overridden as asked."""
    hello: dict[str, Any] = {
        "type": "client_hello", "session_id": session_id, "role": role,
        "protocol_version": 1, "client_nonce": base64.b64encode(os.urandom(16)).decode(),
        "compression": ["none"], "peer_id": peer_id,
    }
    hello.update(overrides)
    return json.dumps(hello)


async def open_ws(http: aiohttp.ClientSession, url: str,
                  **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    """Open a WebSocket without compression and without client heartbeats."""
    return await http.ws_connect(url, compress=0, autoping=True, max_msg_size=0,
                                 timeout=aiohttp.ClientWSTimeout(ws_close=5.0), **kwargs)


async def join(http: aiohttp.ClientSession, relay: Any, session_id: str, role: str,  # noqa: PLR0917
               peer_id: str, token: str | None = None) -> TestPeer:
    """Connect, send the hello, wait for server_hello; return the joined peer."""
    token = token if token is not None else relay.mint(session_id)
    ws = await open_ws(http, relay.ws_url(session_id, token))
    await ws.send_str(client_hello(session_id, role, peer_id))
    peer = TestPeer(ws, session_id, role, peer_id)
    msg = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise UnexpectedMessage(f"expected server_hello, got {msg.type!r} {msg.data!r} "
                                f"{msg.extra!r}")
    peer.server_hello = json.loads(msg.data)
    if peer.server_hello.get("type") != "server_hello":
        raise UnexpectedMessage(f"expected server_hello, got {peer.server_hello}")
    return peer


async def join_peer(http: aiohttp.ClientSession, relay: Any, session_id: str, role: str,
                    peer_id: str, *, token: str | None = None, client_nonce: str | None = None,
                    autoping: bool = True) -> TestPeer:
    """Like :func:`join`, with a chosen ``client_nonce`` and ``autoping`` (False: the test
    sees the relay's pings and nothing answers them)."""
    token = token if token is not None else relay.mint(session_id)
    ws = await http.ws_connect(relay.ws_url(session_id, token), compress=0, autoping=autoping,
                               max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
    overrides = {} if client_nonce is None else {"client_nonce": client_nonce}
    await ws.send_str(client_hello(session_id, role, peer_id, **overrides))
    peer = TestPeer(ws, session_id, role, peer_id)
    msg = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
    if msg.type is not aiohttp.WSMsgType.TEXT:
        await ws.close()
        raise UnexpectedMessage(f"expected server_hello, got {msg.type!r} {msg.data!r} "
                                f"{msg.extra!r}")
    peer.server_hello = json.loads(msg.data)
    if peer.server_hello.get("type") != "server_hello":
        raise UnexpectedMessage(f"expected server_hello, got {peer.server_hello}")
    return peer


Closed = tuple[list[Any], tuple[int, str]]  # (messages before the close, (code, reason))


async def messages_until_close(peer: TestPeer,
                               timeout: float = RECEIVE_TIMEOUT_S) -> Closed:  # noqa: ASYNC109
    """Everything ``peer`` receives up to the close: events (dicts) and frames (bytes),
    collected events first; then the close's (code, reason), or (close code or -1, "")
    when the connection ends without a close frame."""
    received: list[Any] = list(peer.events)
    peer.events.clear()
    while True:
        msg = await peer.ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            received.append(json.loads(msg.data))
        elif msg.type is aiohttp.WSMsgType.BINARY:
            received.append(msg.data)
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            return received, (int(msg.data), str(msg.extra))
        else:
            return received, (peer.ws.close_code or -1, "")


async def assert_relaying(host: TestPeer, part: TestPeer) -> None:
    """One frame each way between ``host`` and ``part``, each received as sent."""
    await host.send_frame(b"host says")
    assert (await part.recv_frame()).payload == b"host says"
    await part.send_frame(b"participant says")
    assert (await host.recv_frame()).payload == b"participant says"


async def join_relaying_pair(http: aiohttp.ClientSession, relay: Any, session_id: str,
                             token: str) -> tuple[TestPeer, TestPeer]:
    """Join host ``h-<session_id>`` and participant ``p-<session_id>`` with ``token`` and
    check that they relay a frame each way; return (host, participant)."""
    host = await join(http, relay, session_id, "host", f"h-{session_id}", token=token)
    part = await join(http, relay, session_id, "participant", f"p-{session_id}", token=token)
    await assert_relaying(host, part)
    return host, part
