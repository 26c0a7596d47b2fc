"""Probes for refusal tests: the contract's error responses, liveness checks, raw WebSocket.

:func:`assert_still_serving` is the check run after every hostile or refused request: a
fresh host and participant must still meet and exchange frames. :func:`upgrade_get`
sends a WebSocket upgrade request that the relay is expected to refuse and returns the
response; :func:`assert_refusal` checks it against the contract (status, JSON body
``{"error", "detail"}``). :class:`RawWebSocket` speaks RFC 6455 by hand over an asyncio
stream so tests can send frames no well-behaved client library would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.support.client import TestPeer, client_hello, join, open_ws
from tests.support.observe import wait_until

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IO_TIMEOUT_S = 10.0


def unique_session(prefix: str) -> str:
    """A session id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def assert_still_serving(relay: Any, http: aiohttp.ClientSession) -> None:
    """Assert that a fresh host/participant pair joins ``relay`` and exchanges frames both ways."""
    session_id = unique_session("alive")
    host = await join(http, relay, session_id, "host", "alive-h")
    part = await join(http, relay, session_id, "participant", "alive-p")
    try:
        await host.send_frame(b"are you there")
        frame = await part.recv_frame()
        assert frame.payload == b"are you there"
        await part.send_frame(b"yes")
        frame = await host.recv_frame()
        assert frame.payload == b"yes"
    finally:
        await part.close()
        await host.close()


@dataclass
class Refused:
    """An HTTP response to a request the relay refused (or answered without upgrading)."""

    status: int
    headers: dict[str, str]
    content_type: str
    body: Any


def upgrade_headers() -> dict[str, str]:
    """Valid WebSocket upgrade request headers (RFC 6455, version 13)."""
    return {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


async def upgrade_get(http: aiohttp.ClientSession, url: str, *, method: str = "GET",
                      upgrade: bool = True, headers: dict[str, str] | None = None) -> Refused:
    """Send ``method url`` (with upgrade headers unless ``upgrade`` is False); return the answer.

    Meant for requests the relay refuses: a 101 answer fails the calling test.
    """
    all_headers = upgrade_headers() if upgrade else {}
    all_headers.update(headers or {})
    async with http.request(method, url, headers=all_headers,
                            timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as resp:
        assert resp.status != 101, f"{method} {url} was upgraded; a refusal was expected"
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return Refused(resp.status, dict(resp.headers), resp.content_type, body)


def assert_refusal(refused: Refused, status: int, error: str) -> None:
    """Assert ``refused`` is the contract's JSON error: ``status`` and ``{"error", "detail"}``."""
    assert (refused.status, refused.content_type) == (status, "application/json"), refused
    assert isinstance(refused.body, dict), refused
    assert set(refused.body) == {"error", "detail"}, refused.body
    assert refused.body["error"] == error, refused.body
    assert isinstance(refused.body["detail"], str) and refused.body["detail"], refused.body


async def open_pending(http: aiohttp.ClientSession, relay: Any,
                       session_id: str) -> aiohttp.ClientWebSocketResponse:
    """Upgrade a connection to ``session_id`` and send nothing (it stays in its handshake)."""
    return await open_ws(http, relay.ws_url(session_id, relay.mint(session_id)))


async def hello_outcome(http: aiohttp.ClientSession, relay: Any, session_id: str,
                        message: str | bytes | None = None, *, token: str | None = None,
                        role: str = "participant", peer_id: str = "p-refused"
                        ) -> tuple[int, str]:
    """Upgrade, send ``message`` (default: a valid hello) and return the relay's (code, reason).

    Fails if the relay answers with anything but a close.
    """
    token = relay.mint(session_id) if token is None else token
    ws = await open_ws(http, relay.ws_url(session_id, token))
    if message is None:
        message = client_hello(session_id, role, peer_id)
    if isinstance(message, bytes):
        await ws.send_bytes(message)
    else:
        await ws.send_str(message)
    peer = TestPeer(ws, session_id, role, peer_id)
    try:
        return await peer.recv_close()
    finally:
        await ws.close()


async def wait_for_connections(relay: Any, http: aiohttp.ClientSession, count: int) -> None:
    """Poll ``/healthz`` until the relay reports ``count`` connections (peers + handshakes)."""

    async def reached() -> bool:
        async with http.get(relay.http_url("/healthz")) as resp:
            return bool((await resp.json())["connections"] == count)

    await wait_until(reached, f"{count} connections on the relay")


# --- raw WebSocket ----------------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
             masked: bool = True) -> bytes:
    """Encode one client frame; ``rsv`` sets the reserved bits (0-7), ``masked`` the MASK bit."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = struct.pack(">BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack(">BBQ", first, mask_bit | 127, n)
    if not masked:
        return header + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + body


class RawWebSocket:
    """A hand-written WebSocket client over an asyncio stream (no validation of its own)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str) -> RawWebSocket:
        """Open ``GET path`` with an upgrade on 127.0.0.1:``port``; assert the 101 answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Connection: Upgrade\r\nUpgrade: websocket\r\n"
                      f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        """Write raw bytes (one or more encoded frames)."""
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[bool, int, bytes]:
        """Read one server frame; return ``(fin, opcode, payload)``."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            first, second = await self.reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            assert not second & 0x80, "a server frame must not be masked"
            payload = await self.reader.readexactly(n)
        return bool(first & 0x80), first & 0x0F, payload

    async def read_close(self) -> tuple[int, str] | None:
        """Skip frames until a close frame; return its (code, reason), None on EOF first."""
        while True:
            try:
                _fin, opcode, payload = await self.read_frame()
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return None
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode()

    async def assert_eof(self) -> None:
        """Assert the server closes the TCP connection (after any frames it still sends)."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return
                if not chunk:
                    return

    async def aclose(self) -> None:
        """Drop the TCP connection and wait until it is gone."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
