"""A peer that reads only when the test says so: a raw WebSocket over a small-buffered socket.

Flow-control tests need a receiver whose bytes pile up at the relay. :class:`SlowReader`
connects with a small ``SO_RCVBUF`` (set before ``connect``, so the kernel does not
autotune it) and an asyncio stream with a small buffer limit, does the RFC 6455 handshake
and the protocol hello by hand, and then reads nothing until :meth:`SlowReader.read_message`
is called. Pings from the relay are not answered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
from typing import Any

from tests.support.client import client_hello

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IO_TIMEOUT_S = 10.0

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one final, masked client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    repeated = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return header + key + body


class SlowReader:
    """A joined peer on a raw socket; it reads the relay's messages only on request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.server_hello: dict[str, Any] = {}

    @classmethod
    async def join(cls, relay: Any, session_id: str, role: str, peer_id: str, *,
                   rcvbuf: int = 4096, stream_limit: int = 4096) -> SlowReader:
        """Connect to ``relay`` with a ``rcvbuf``-byte receive buffer, upgrade and say hello.

        Returns once the server hello has been read; nothing more is read after that.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", relay.port)),
                                   IO_TIMEOUT_S)
            reader, writer = await asyncio.open_connection(sock=sock, limit=stream_limit)
        except BaseException:
            sock.close()
            raise
        peer = cls(reader, writer)
        try:
            await peer._upgrade(f"/ws?session={session_id}&token={relay.mint(session_id)}",
                                relay.port)
            writer.write(masked_frame(OP_TEXT, client_hello(session_id, role, peer_id).encode()))
            await writer.drain()
            opcode, payload = await peer.read_message()
            assert opcode == OP_TEXT, (opcode, payload)
            peer.server_hello = json.loads(payload)
            assert peer.server_hello["type"] == "server_hello", peer.server_hello
        except BaseException:
            peer.close()
            raise
        return peer

    async def _upgrade(self, path: str, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Connection: Upgrade\r\nUpgrade: websocket\r\n"
                           f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
                           ).encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message."""
        self.writer.write(masked_frame(OP_BINARY, data))
        await self.writer.drain()

    async def read_message(self, within_s: float = IO_TIMEOUT_S) -> tuple[int, bytes]:
        """Read the next whole message (pings included); return ``(opcode, payload)``.

        Raises ``asyncio.IncompleteReadError`` or ``ConnectionResetError`` when the relay
        drops the connection.
        """
        async with asyncio.timeout(within_s):
            parts: list[bytes] = []
            message_opcode = 0
            while True:
                first, second = await self.reader.readexactly(2)
                assert not second & 0x80, "a server frame must not be masked"
                n = second & 0x7F
                if n == 126:
                    (n,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(n)
                opcode = first & 0x0F
                if opcode >= 0x8:  # control frames are never fragmented
                    return opcode, payload
                if opcode:
                    message_opcode = opcode
                parts.append(payload)
                if first & 0x80:
                    return message_opcode, b"".join(parts)

    async def read_until_close(self, within_s: float = IO_TIMEOUT_S
                               ) -> tuple[list[tuple[int, bytes]], tuple[int, str] | None]:
        """Read everything up to the close frame.

        Returns the messages before it (pings left out) and the close's ``(code, reason)``,
        or None in its place if the connection ended without a close frame.
        """
        messages: list[tuple[int, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            try:
                opcode, payload = await self.read_message(max(0.0, deadline - loop.time()))
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return messages, None
            if opcode == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                return messages, (code, payload[2:].decode())
            if opcode != OP_PING:
                messages.append((opcode, payload))

    def close(self) -> None:
        """Drop the TCP connection."""
        self.writer.close()
