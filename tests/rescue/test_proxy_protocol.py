"""Tests for rescue.proxy_protocol: PROXY v1/v2 headers, their exact lengths, refusals."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.proxy_protocol import (
    MAX_HEADER_LENGTH,
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    format_v1,
    format_v2,
    parse_proxy_header,
)

REQUEST = b"GET /ws?session=s1 HTTP/1.1\r\nHost: relay\r\n\r\n"


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    """A raw v2 header with the given fields (``length`` overrides the block's length)."""
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam,
                                      len(block) if length is None else length) + block


# --- version 1 ----------------------------------------------------------------------------

def test_v1_tcp4_gives_source_destination_and_exact_length() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    header = parse_proxy_header(line + REQUEST)
    assert header == ProxyHeader(len(line), 1, ("203.0.113.7", 56324), ("192.0.2.1", 443))


def test_v1_tcp6_normalises_the_address() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 65535\r\n"
    header = parse_proxy_header(line)
    assert header is not None
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::1", 65535)
    assert header.length == len(line)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_is_valid_without_an_address(line: bytes) -> None:
    assert parse_proxy_header(line + REQUEST) == ProxyHeader(len(line), 1)


@pytest.mark.parametrize("partial", [b"", b"P", b"PROXY", b"PROXY TCP4 1.2.3.4",
                                     b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_incomplete_line_needs_more(partial: bytes) -> None:
    assert parse_proxy_header(partial) is None


@pytest.mark.parametrize("data", [
    REQUEST,  # plain HTTP: no header at all
    b"GET",
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # the keyword is case-sensitive
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",  # v6 addresses under TCP4
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
    b"PROXY TCP4 " + b"1" * V1_MAX_LENGTH,  # never terminated within the bound
])
def test_v1_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


# --- version 2 ----------------------------------------------------------------------------

def test_v2_inet_gives_source_and_skips_tlvs() -> None:
    tlvs = b"\x01\x00\x08http/1.1" + b"\x05\x00\x04abcd"  # ALPN, unique id
    raw = format_v2(("198.51.100.9", 40000), ("10.0.0.2", 9443), tlvs)
    header = parse_proxy_header(raw + REQUEST)
    assert header == ProxyHeader(len(raw), 2, ("198.51.100.9", 40000), ("10.0.0.2", 9443))


def test_v2_inet6() -> None:
    raw = format_v2(("2001:db8::7", 1234), ("2001:db8::1", 443))
    header = parse_proxy_header(raw)
    assert header is not None and header.source == ("2001:db8::7", 1234)
    assert header.length == 16 + 36


def test_v2_local_is_valid_and_ignores_addresses() -> None:
    # A balancer's health check: LOCAL, whatever family and block it carries.
    for raw in (format_v2(None), v2(0x20, 0x11, b"\x00" * 12), v2(0x20, 0x00, b"junk")):
        assert parse_proxy_header(raw + REQUEST) == ProxyHeader(len(raw), 2)


@pytest.mark.parametrize("fam", [0x00, 0x12, 0x31, 0x32])
def test_v2_families_without_a_tcp_client_fall_back_to_the_peer(fam: int) -> None:
    raw = v2(0x21, fam, b"\x00" * 216)
    assert parse_proxy_header(raw) == ProxyHeader(len(raw), 2)


@pytest.mark.parametrize("raw", [
    v2(0x11, 0x11, b"\x00" * 12),  # version 1 in the v2 format
    v2(0x22, 0x11, b"\x00" * 12),  # command 2
    v2(0x21, 0x41, b"\x00" * 12),  # family 4
    v2(0x21, 0x13, b"\x00" * 12),  # transport 3
    v2(0x21, 0x11, b"\x00" * 11),  # IPv4 needs 12 bytes
    v2(0x21, 0x21, b"\x00" * 35),  # IPv6 needs 36
    v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1),
    b"\r\n\r\n\x00\r\nQUIT\r",  # signature broken at its last byte
    b"\r\n\r\nGET",
])
def test_v2_malformed_is_refused(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(raw)


def test_v2_incomplete_needs_more_at_every_cut() -> None:
    raw = format_v2(("192.0.2.4", 5), tlvs=b"\x04\x00\x00")
    for cut in range(len(raw)):
        assert parse_proxy_header(raw[:cut]) is None, cut
    assert parse_proxy_header(raw) is not None


def test_largest_accepted_header_fits_the_documented_bound() -> None:
    raw = v2(0x21, 0x11, b"\x00" * V2_MAX_PAYLOAD)
    header = parse_proxy_header(raw)
    assert header is not None and header.length == MAX_HEADER_LENGTH


# --- properties ---------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoints = st.one_of(st.tuples(ipv4, ports), st.tuples(ipv6, ports))


@given(endpoints, ports, st.sampled_from([1, 2]), st.binary(max_size=64))
def test_formatted_headers_parse_back_exactly(source: tuple[str, int], dport: int,
                                              version: int, rest: bytes) -> None:
    family = ipaddress.ip_address(source[0]).version
    destination = ("10.1.2.3" if family == 4 else "fd00::3", dport)
    raw = (format_v1 if version == 1 else format_v2)(source, destination)
    header = parse_proxy_header(raw + rest)
    assert header == ProxyHeader(len(raw), version, source, destination)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_and_never_overrun(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= min(len(data), MAX_HEADER_LENGTH)


@given(st.sampled_from([format_v1(("192.0.2.1", 80)), format_v2(("192.0.2.1", 80)),
                        format_v1(None), format_v2(None)]),
       st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_a_corrupted_header_is_refused_or_reparsed_never_misread(
        raw: bytes, position: int, junk: bytes) -> None:
    """Overwriting bytes of a valid header gives a refusal, "need more", or a header that
    still lies within the bytes given: never an exception of another type."""
    position %= len(raw)
    data = raw[:position] + junk + raw[position + len(junk):]
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert header is None or header.length <= len(data)


@given(st.binary(min_size=1, max_size=40).filter(lambda b: not b.startswith((b"P", b"\r"))))
def test_anything_not_starting_like_a_header_is_refused_at_once(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)
