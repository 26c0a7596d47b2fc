"""The PROXY protocol header (versions 1 and 2) a load balancer puts before a connection's
first byte, so the relay learns the client's address behind it.

HAProxy's specification (``proxy-protocol.txt``): version 1 is one text line
``PROXY TCP4|TCP6|UNKNOWN <src> <dst> <sport> <dport>\\r\\n`` of at most 107 bytes;
version 2 is a 16-byte binary block (a 12-byte signature, version and command, family
and transport, a big-endian length) followed by that many bytes of addresses and TLVs.

Sans-I/O: :func:`parse_proxy_header` looks at the bytes peeked so far and answers
"need more", "invalid" (:class:`ProxyHeaderError`) or the header with its exact length,
which the caller then consumes from the socket before the HTTP request is read. A
LOCAL command (v2, a balancer's own health check) and ``UNKNOWN`` (v1) are valid and
carry no client address: the connection's own peer is the client.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""The longest version-1 line, CRLF included (the specification's bound)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")
V2_MAX_PAYLOAD = 4096
"""Longest version-2 address-and-TLV block accepted; longer headers are refused (a
balancer sends well under 1 KiB even with every TLV it knows)."""
MAX_HEADER_LENGTH = V2_HEADER.size + V2_MAX_PAYLOAD

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0x0, 0x1, 0x2
_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: consume ``length`` bytes; ``source`` is the client (None: use the
    connection's own peer, for LOCAL, UNKNOWN, UNSPEC and UNIX headers)."""

    length: int
    version: int
    source: Address | None = None
    destination: Address | None = None


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``data``; None if more bytes are needed.

    Raises :class:`ProxyHeaderError` as soon as the bytes cannot begin a valid header
    (plain HTTP without a header fails on its first byte).
    """
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _is_prefix(data: bytes, full: bytes) -> bool:
    """True if ``data`` starts with ``full``, or is a beginning of it."""
    return full.startswith(data) if len(data) < len(full) else data.startswith(full)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not _is_prefix(data, V1_PREFIX):
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyHeaderError("PROXY v1 line is not terminated by CRLF within "
                                   f"{V1_MAX_LENGTH} bytes")
        return None
    line = data[len(V1_PREFIX):end]
    length = end + 2
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":
        return ProxyHeader(length, 1)  # the rest of the line is to be ignored
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 line must be TCP4|TCP6 with two addresses and "
                               "two ports")
    family = ipaddress.IPv4Address if parts[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        src = str(family(parts[1].decode("ascii")))
        dst = str(family(parts[2].decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"PROXY v1 addresses are not {parts[0].decode()}") from None
    return ProxyHeader(length, 1, (src, _v1_port(parts[3])), (dst, _v1_port(parts[4])))


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[:1] == b"0"):
        raise ProxyHeaderError("PROXY v1 port is not a decimal number")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1 port is over 65535")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not _is_prefix(data, V2_SIGNATURE):
        raise ProxyHeaderError("bad PROXY v2 signature")
    if len(data) < V2_HEADER.size:
        return None
    _sig, ver_cmd, fam, payload_length = V2_HEADER.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    family, transport = fam >> 4, fam & 0xF
    if family not in _ADDRESS_LENGTH or transport not in (
            _TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM):
        raise ProxyHeaderError(f"PROXY v2 header with unknown family/transport {fam:#04x}")
    if payload_length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {payload_length} bytes is over "
                               f"{V2_MAX_PAYLOAD}")
    length = V2_HEADER.size + payload_length
    if len(data) < length:
        return None
    if command == _V2_COMMAND_LOCAL:
        return ProxyHeader(length, 2)  # a balancer's own connection: ignore the addresses
    if payload_length < _ADDRESS_LENGTH[family]:
        raise ProxyHeaderError("PROXY v2 address block is shorter than its family needs")
    if family not in (_AF_INET, _AF_INET6) or transport != _TRANSPORT_STREAM:
        return ProxyHeader(length, 2)  # not a TCP client: the connection's peer stands
    size = 4 if family == _AF_INET else 16
    at = V2_HEADER.size
    src = ipaddress.ip_address(data[at:at + size])
    dst = ipaddress.ip_address(data[at + size:at + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, at + 2 * size)
    return ProxyHeader(length, 2, (str(src), sport), (str(dst), dport))


def format_v1(source: Address | None, destination: Address | None = None) -> bytes:
    """A version-1 line for ``source`` → ``destination`` (``UNKNOWN`` when ``source`` is
    None); for tests and tools."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    destination = destination or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {proto} {source[0]} {destination[0]} {source[1]} "
            f"{destination[1]}\r\n").encode()


def format_v2(source: Address | None, destination: Address | None = None,
              tlvs: bytes = b"") -> bytes:
    """A version-2 header: PROXY from ``source`` (LOCAL when ``source`` is None), with
    ``tlvs`` appended raw to the address block; for tests and tools."""
    if source is None:
        return V2_HEADER.pack(V2_SIGNATURE, 0x20 | _V2_COMMAND_LOCAL, 0, len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    destination = destination or (("::" if src.version == 6 else "0.0.0.0"), 0)
    dst = ipaddress.ip_address(destination[0])
    family = _AF_INET if src.version == 4 else _AF_INET6
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_HEADER.pack(V2_SIGNATURE, 0x20 | _V2_COMMAND_PROXY,
                          family << 4 | _TRANSPORT_STREAM, len(block)) + block
