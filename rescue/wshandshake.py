"""The server side of the WebSocket opening handshake (RFC 6455 section 4.2), sans I/O.

The relay answers the upgrade itself instead of through aiohttp's ``WebSocketResponse``:
after :func:`check_upgrade` accepts the request's headers, :func:`switching_protocols` is
the complete ``101`` response to write to the transport, and the connection's bytes from
then on are WebSocket frames (:mod:`rescue.wsreader`). No extension (permessage-deflate)
and no subprotocol is ever negotiated: frames are end-to-end encrypted and do not compress.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

from rescue.codes import ErrorCode, Refusal

#: The only protocol version this server speaks; sent back when a client asks for another.
VERSION = "13"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class VersionRefused(Refusal):
    """The client asked for a WebSocket version other than 13 (answer with ``VERSION``)."""


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()  # RFC 6455 requires SHA-1
    return base64.b64encode(digest).decode("ascii")


def check_upgrade(method: str, headers: Mapping[str, str]) -> str:
    """Check an upgrade request's method and headers; return its ``Sec-WebSocket-Accept``.

    ``headers`` must look names up case-insensitively (aiohttp's ``CIMultiDict`` does).
    Raises :class:`~rescue.codes.Refusal` (400 ``bad_request``) naming what is wrong, or
    :class:`VersionRefused` for a version other than 13.
    """
    if method != "GET":
        raise Refusal(ErrorCode.BAD_REQUEST, f"a WebSocket upgrade must be GET, not {method}")
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        raise Refusal(ErrorCode.BAD_REQUEST, "the Upgrade header must be `websocket`")
    getall = getattr(headers, "getall", None)  # a multidict: Connection may come on several lines
    connection = ",".join(getall("Connection", ())) if getall else headers.get("Connection", "")
    if "upgrade" not in _tokens(connection):
        raise Refusal(ErrorCode.BAD_REQUEST, "the Connection header must contain `Upgrade`")
    if headers.get("Content-Length", "0").strip() not in ("", "0") or \
            "Transfer-Encoding" in headers:
        # the HTTP parser would read the frames after it as the request's body
        raise Refusal(ErrorCode.BAD_REQUEST, "a WebSocket upgrade request carries no body")
    version = headers.get("Sec-WebSocket-Version", "").strip()
    if version != VERSION:
        raise VersionRefused(ErrorCode.BAD_REQUEST,
                             f"unsupported Sec-WebSocket-Version {version[:16]!r}; use 13")
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise Refusal(ErrorCode.BAD_REQUEST,
                      "Sec-WebSocket-Key must be 16 bytes in base64")
    return accept_value(key)


def switching_protocols(accept: str) -> bytes:
    """The complete ``101 Switching Protocols`` response for an accepted upgrade."""
    return (b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode("ascii") + b"\r\n\r\n")
