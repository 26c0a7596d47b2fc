"""A minimal WebSocket client for the benches that need to see every byte of the handshake.

The multi-worker benches must tell an HTTP 503 from a reset, time a single connection from
its TCP connect to its ``server_hello`` without an event loop in between, and reconnect
thousands of peers cheaply; so this is a small RFC 6455 client of its own:

* :func:`upgrade_request`, :func:`parse_response_head`, :func:`encode_frame` and
  :class:`FrameParser` are the codec (client frames masked, server frames unmasked);
* :func:`hello_blocking` runs upgrade + hello on a connected blocking socket;
* :class:`WsClient` is the same as an :class:`asyncio.Protocol` for uvloop, with hooks a
  subclass overrides.

It speaks just enough of the protocol for the relay: no extensions, no fragmented sends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
HEADER = struct.Struct(">BBHI")
MAX_HEAD = 16384


def upgrade_request(host: str, port: int, session_id: str, token: str) -> bytes:
    """Return the HTTP upgrade request for ``/ws?session=..&token=..``."""
    key = base64.b64encode(os.urandom(16)).decode()
    query = f"session={session_id}" + (f"&token={token}" if token else "")
    return (f"GET /ws?{query} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def client_hello(session_id: str, role: str, peer_id: str) -> bytes:
    """Return the JSON of a protocol-v1 ``client_hello``."""
    return json.dumps({"type": "client_hello", "session_id": session_id, "role": role,
                       "protocol_version": 1,
                       "client_nonce": base64.b64encode(os.urandom(16)).decode(),
                       "compression": ["none"], "peer_id": peer_id}).encode()


@dataclass
class ResponseHead:
    """The status of an HTTP response, its JSON ``error`` code if any, and its length."""

    status: int
    error: str
    size: int


def parse_response_head(buf: bytes | bytearray) -> ResponseHead | None:
    """Parse the head (and, for a refusal, the JSON body) at the start of ``buf``.

    Returns None while the head is incomplete; ``size`` is the bytes the response took
    (head only for a 101; for other statuses the body too, when ``Content-Length`` is
    there and the body has arrived, else the head only and ``error`` is empty).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            return ResponseHead(0, "response head too long", len(buf))
        return None
    head = bytes(buf[:end]).decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return ResponseHead(0, f"bad status line {lines[0][:60]!r}", end + 4)
    size = end + 4
    if status == 101:
        return ResponseHead(101, "", size)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    error = ""
    if length and len(buf) >= size + length:
        try:
            error = str(json.loads(bytes(buf[size:size + length])).get("error", ""))
        except (ValueError, AttributeError):
            error = "non-JSON body"
        size += length
    return ResponseHead(status, error, size)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """Return one final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return head + mask + payload


def binary_frame(kind: int, seq: int, payload: bytes) -> bytes:
    """Return a masked WebSocket binary message carrying a protocol frame (8-byte header)."""
    return encode_frame(OP_BINARY, HEADER.pack(1, kind, len(payload), seq & 0xFFFFFFFF)
                        + payload)


class FrameParser:
    """Splits the server's byte stream into ``(opcode, payload)`` messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.partial: list[bytes] = []
        self.partial_op = 0

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        """Add ``data``; return the complete messages it finished, in order."""
        self.buf += data
        out: list[tuple[int, bytes]] = []
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4  # a masked server frame is a protocol error; we just unmask nothing
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head:pos + head + n])
            pos += head + n
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode == OP_CONT:
                self.partial.append(payload)
                if fin:
                    out.append((self.partial_op, b"".join(self.partial)))
                    self.partial = []
            elif not fin and opcode < 8:
                self.partial_op, self.partial = opcode, [payload]
            else:
                out.append((opcode, payload))
        del buf[:pos]
        return out


class HandshakeError(Exception):
    """The upgrade or the hello did not succeed; ``reason`` is a short class of the failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hello_blocking(sock: socket.socket, request: bytes, hello: bytes,
                   timeout_s: float = 10.0) -> dict[str, Any]:
    """Send ``request``, wait for 101, send ``hello``, return the parsed ``server_hello``.

    ``sock`` is connected and blocking; raises :class:`HandshakeError` on a refusal, a close
    or a timeout.
    """
    deadline = time.monotonic() + timeout_s
    sock.sendall(request)
    buf = bytearray()
    head = None
    while head is None:
        buf += _recv_until(sock, deadline)
        head = parse_response_head(buf)
    if head.status != 101:
        raise HandshakeError(f"http {head.status} {head.error}".strip())
    del buf[:head.size]
    sock.sendall(encode_frame(OP_TEXT, hello))
    parser = FrameParser()
    pending = bytes(buf)
    while True:
        for opcode, payload in parser.feed(pending):
            if opcode == OP_TEXT:
                event: dict[str, Any] = json.loads(payload)
                if event.get("type") == "server_hello":
                    return event
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                raise HandshakeError(f"closed {code} before server_hello")
        pending = _recv_until(sock, deadline)


def _recv_until(sock: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandshakeError("timeout")
    sock.settimeout(left)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise HandshakeError("timeout") from None
    except ConnectionError as e:
        raise HandshakeError(type(e).__name__) from None
    if not data:
        raise HandshakeError("eof")
    return data


class WsClient(asyncio.Protocol):
    """One client connection: upgrade, hello, then frames; a subclass overrides the hooks.

    Hooks: :meth:`on_open` (101 received, the hello was sent), :meth:`on_refused` (a non-101
    answer), :meth:`on_text`, :meth:`on_binary`, :meth:`on_lost` (the connection ended, for
    whatever reason; always called once).
    """

    def __init__(self, request: bytes, hello: bytes) -> None:
        self.request = request
        self.hello = hello
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport instances
        self.upgraded = False
        self.head_buf = bytearray()
        self.parser = FrameParser()
        self.close_code: int | None = None
        self.refused: ResponseHead | None = None

    # --- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        self.transport = transport
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        """Parse the response head, then frames."""
        if not self.upgraded:
            self.head_buf += data
            head = parse_response_head(self.head_buf)
            if head is None:
                return
            if head.status != 101:
                self.refused = head
                self.on_refused(head)
                self.abort()
                return
            self.upgraded = True
            rest = bytes(self.head_buf[head.size:])
            self.head_buf = bytearray()
            self.send(OP_TEXT, self.hello)
            self.on_open()
            data = rest
            if not data:
                return
        for opcode, payload in self.parser.feed(data):
            if opcode == OP_BINARY:
                self.on_binary(payload)
            elif opcode == OP_TEXT:
                self.on_text(payload)
            elif opcode == OP_PING:
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                self.send(OP_CLOSE, payload[:2])
                self.abort()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        """Report the end once."""
        self.transport = None
        self.on_lost(exc)

    # --- actions -----------------------------------------------------------------------
    def send(self, opcode: int, payload: bytes) -> None:
        """Send one message if the connection is still open."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def send_raw(self, data: bytes) -> None:
        """Write already-encoded frames."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, code: int = 1000) -> None:
        """Send a close frame and close the transport (without waiting for the reply)."""
        if self.transport is not None and not self.transport.is_closing():
            if self.upgraded:
                self.transport.write(encode_frame(OP_CLOSE, code.to_bytes(2, "big")))
            self.transport.close()

    def abort(self) -> None:
        """Close the transport now."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- hooks -------------------------------------------------------------------------
    def on_open(self) -> None:
        """The upgrade succeeded and the hello is on its way."""

    def on_refused(self, head: ResponseHead) -> None:
        """The relay answered the upgrade with ``head.status`` (not 101)."""

    def on_text(self, payload: bytes) -> None:
        """A text message (an event or the ``server_hello``) arrived."""

    def on_binary(self, payload: bytes) -> None:
        """A binary message (a protocol frame) arrived."""

    def on_lost(self, exc: Exception | None) -> None:
        """The connection is gone."""
