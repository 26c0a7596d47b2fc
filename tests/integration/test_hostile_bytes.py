"""Hostile bytes on the public port: garbage, truncated and oversized requests, slowloris,
broken upgrades and invalid WebSocket frames. None of them may hurt the next client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.support.client import client_hello
from tests.support.observe import admin_stats, free_port
from tests.support.probes import (
    RawWebSocket,
    assert_still_serving,
    unique_session,
    wait_for_connections,
    ws_frame,
)
from tests.support.relay import RelayProcess

RelayFactory = Callable[..., RelayProcess]
IO_TIMEOUT_S = 10.0
ADMIN_KEY = "hostile-admin-key"


@dataclass
class RawResponse:
    """What came back on a raw connection: the parsed head (if any) and the body."""

    raw: bytes
    status: int | None
    headers: dict[str, str]
    body: bytes


def parse_response(raw: bytes) -> RawResponse:
    """Parse one HTTP/1.x response (or nothing, if the server just closed)."""
    if not raw:
        return RawResponse(raw, None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith(("HTTP/1.1 ", "HTTP/1.0 ")), raw[:200]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(raw, int(status_line.split()[1]), headers, body)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """Read one response: up to Content-Length when given, else to EOF; b"" if closed."""
    async with asyncio.timeout(IO_TIMEOUT_S):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            return e.partial
        except ConnectionResetError:
            return b""
        length = parse_response(head).headers.get("content-length")
        if length is not None:
            return head + await reader.readexactly(int(length))
        return head + await reader.read()


async def send_raw(port: int, data: bytes, *, then_eof: bool = False) -> RawResponse:
    """Write ``data`` on a new connection and return the server's answer (or its silence)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await writer.drain()
            if then_eof:
                writer.write_eof()
        except ConnectionError:
            pass  # the server may close before it has read everything
        return parse_response(await read_response(reader))
    finally:
        await close_writer(writer)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream and wait until its transport is gone (errors of a dead peer ignored)."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def assert_answered_4xx_or_closed(response: RawResponse) -> None:
    if response.status is not None:
        assert 400 <= response.status < 500, response.raw[:300]


def assert_contract_error(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status, response.raw[:300]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert set(body) == {"error", "detail"} and body["error"] == error, body


async def admin_counters(relay: RelayProcess, http: aiohttp.ClientSession) -> dict[str, Any]:
    counters: dict[str, Any] = (await admin_stats(http, relay, ADMIN_KEY))["counters"]
    return counters


def ws_request(relay: RelayProcess, session_id: str, *, drop: str = "") -> bytes:
    """A WebSocket upgrade request for ``session_id``, without the header named ``drop``."""
    token = relay.mint(session_id)
    headers = {"Host": f"127.0.0.1:{relay.port}", "Connection": "Upgrade",
               "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    headers.pop(drop, None)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"GET /ws?session={session_id}&token={token} HTTP/1.1\r\n{lines}\r\n").encode()


# --- not HTTP at all ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
async def test_random_binary_is_refused_or_dropped(relay: RelayProcess,
                                                   http: aiohttp.ClientSession,
                                                   seed: int) -> None:
    garbage = random.Random(seed).randbytes(4096)
    assert_answered_4xx_or_closed(await send_raw(relay.port, garbage))
    await assert_still_serving(relay, http)


async def test_a_tls_client_hello_is_refused_or_dropped(relay: RelayProcess,
                                                        http: aiohttp.ClientSession) -> None:
    # The first bytes of a TLS 1.2 ClientHello record: someone pointed https:// at us.
    hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + bytes(100)
    assert_answered_4xx_or_closed(await send_raw(relay.port, hello))
    await assert_still_serving(relay, http)


async def test_two_hundred_concurrent_garbage_connections(relay: RelayProcess,
                                                          http: aiohttp.ClientSession) -> None:
    rng = random.Random(200)
    responses = await asyncio.gather(*(
        send_raw(relay.port, rng.randbytes(rng.randrange(1, 2048))) for _ in range(200)))
    for response in responses:
        assert_answered_4xx_or_closed(response)
    await assert_still_serving(relay, http)


# --- broken HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [3, 20, 60, -4])
async def test_a_truncated_request_then_eof(relay: RelayProcess, http: aiohttp.ClientSession,
                                            cut: int) -> None:
    request = ws_request(relay, unique_session("cut"))
    response = await send_raw(relay.port, request[:cut], then_eof=True)
    assert_answered_4xx_or_closed(response)
    await assert_still_serving(relay, http)


@pytest.mark.parametrize("where", ["header-line", "request-line", "many-headers"])
async def test_huge_requests_are_refused(relay: RelayProcess, http: aiohttp.ClientSession,
                                         where: str) -> None:
    big = "a" * 100_000
    if where == "header-line":
        request = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
    elif where == "request-line":
        request = f"GET /healthz?pad={big} HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        request = "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"X-H{i}: v\r\n" for i in range(5000)) + "\r\n"
    response = await send_raw(relay.port, request.encode())
    assert_answered_4xx_or_closed(response)
    await assert_still_serving(relay, http)


MALFORMED_REQUESTS = (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                      b"GET /healthz?" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
                      b"GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n")


@pytest.mark.parametrize("log_level", ["info", "debug"])
async def test_malformed_requests_are_not_logged_as_errors(relay_factory: RelayFactory,
                                                           log_level: str) -> None:
    # aiohttp logs each malformed request at ERROR with a traceback; the relay turns that
    # into one debug event, http.bad_request, so hostile clients cannot flood the log.
    quiet = relay_factory(log_level=log_level)
    for request in MALFORMED_REQUESTS:
        response = await send_raw(quiet.port, request)
        assert response.status == 400, response.raw[:300]
    quiet.stop()
    records = [json.loads(line) for line in quiet.lines]  # JSON only: no traceback lines
    assert [r for r in records if r.get("level") in ("error", "critical")] == []
    bad_requests = [r for r in records if r.get("event") == "http.bad_request"]
    if log_level == "info":
        assert bad_requests == []
        return
    assert len(bad_requests) == len(MALFORMED_REQUESTS), bad_requests
    for record in bad_requests:
        assert record["level"] == "debug", record
        assert isinstance(record.get("error"), str) and record["error"] != "unknown", record


async def test_an_upgrade_without_a_key_is_bad_request(relay: RelayProcess,
                                                       http: aiohttp.ClientSession) -> None:
    response = await send_raw(relay.port, ws_request(relay, unique_session("nokey"),
                                                     drop="Sec-WebSocket-Key"))
    assert_contract_error(response, 400, "bad_request")
    await wait_for_connections(relay, http, 0)  # the refused upgrade holds no slot
    await assert_still_serving(relay, http)


async def test_an_upgrade_with_a_malformed_key_is_bad_request(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    request = ws_request(relay, unique_session("badkey")).replace(
        b"dGhlIHNhbXBsZSBub25jZQ==", b"not base64 at all!")
    assert_contract_error(await send_raw(relay.port, request), 400, "bad_request")
    await assert_still_serving(relay, http)


async def test_an_upgrade_with_a_body_is_bad_request(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    # Otherwise the frames after it would be read as the request's body and never arrive.
    request = ws_request(relay, unique_session("body")).replace(
        b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello")
    assert_contract_error(await send_raw(relay.port, request), 400, "bad_request")
    await wait_for_connections(relay, http, 0)
    await assert_still_serving(relay, http)


async def test_an_unsupported_websocket_version_is_refused(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    request = ws_request(relay, unique_session("ver")).replace(
        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99")
    response = await send_raw(relay.port, request)
    assert response.status is not None and 400 <= response.status < 500
    assert response.headers["content-type"].startswith("application/json")
    assert json.loads(response.body)["error"] in ("bad_request", "upgrade_required")
    await wait_for_connections(relay, http, 0)
    await assert_still_serving(relay, http)


async def test_an_unsupported_version_answer_names_version_13(relay: RelayProcess) -> None:
    # RFC 6455 section 4.4: a refused version is answered with the supported versions.
    request = ws_request(relay, unique_session("ver")).replace(
        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99")
    response = await send_raw(relay.port, request)
    assert_contract_error(response, 400, "bad_request")
    assert response.headers.get("sec-websocket-version") == "13"


# --- slow clients ------------------------------------------------------------------------
#
# Two deadlines of handshake_timeout_s guard the way in. The worker's intake peeks at the
# request line before routing; a connection without a complete request line by then is
# answered 408 and closed (intake counter peek_timeouts). A routed request whose headers
# do not complete in time is closed by aiohttp's header deadline, without an answer
# (worker counter header_timeouts).


@pytest.fixture
def deadline_relay(relay_factory: RelayFactory) -> RelayProcess:
    return relay_factory(handshake_timeout_s=1, admin_port=free_port(), admin_key=ADMIN_KEY)


async def way_in_counters(relay: RelayProcess, http: aiohttp.ClientSession) -> tuple[int, int]:
    """``(intake peek_timeouts, header_timeouts)`` of the relay's single worker."""
    stats = await admin_stats(http, relay, ADMIN_KEY)
    return stats["intake"]["peek_timeouts"], stats["counters"]["header_timeouts"]


async def _read_until_closed(sock: socket.socket, received: bytearray) -> None:
    """Collect what the server sends until it closes (FIN or reset)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.sock_recv(sock, 4096)
        except ConnectionResetError:
            return  # what arrived before the reset stays in ``received``
        if not chunk:
            return
        received += chunk


async def _trickle_until_closed(port: int, first: bytes, trickle: bytes, *,
                                first_gap_s: float = 0.3) -> tuple[float, bytes]:
    """Send ``first``, then one byte of ``trickle`` every 0.3 s (the first after
    ``first_gap_s``) until the server closes; return the seconds that took and its answer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    received = bytearray()
    closed: asyncio.Future[None] | None = None
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        started = loop.time()
        await loop.sock_sendall(sock, first)
        closed = asyncio.ensure_future(_read_until_closed(sock, received))
        for i in range(len(trickle)):
            done, _ = await asyncio.wait({closed}, timeout=first_gap_s if i == 0 else 0.3)
            if done:
                break
            try:
                await loop.sock_sendall(sock, trickle[i:i + 1])
            except ConnectionError:
                break
        async with asyncio.timeout(IO_TIMEOUT_S):
            await closed
        return loop.time() - started, bytes(received)
    finally:
        if closed is not None:
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closed
        sock.close()


def assert_request_timeout(answer: bytes) -> None:
    """The intake's answer to a connection without a routable request line: 408, closed."""
    response = parse_response(answer)
    assert_contract_error(response, 408, "bad_request")
    assert response.headers.get("connection") == "close", response.headers


async def test_a_slowloris_request_is_cut_off(deadline_relay: RelayProcess,
                                              http: aiohttp.ClientSession) -> None:
    peeks_before, headers_before = await way_in_counters(deadline_relay, http)
    elapsed, answer = await _trickle_until_closed(
        deadline_relay.port, b"GET /healthz HTTP/1.1\r\n",
        b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 60)  # 18 s of trickle if nobody stops it
    assert 0.8 <= elapsed < 5.0
    assert answer == b""  # the header deadline closes without answering
    # The request line was complete at once: the peek routed it, aiohttp's deadline cut it.
    assert await way_in_counters(deadline_relay, http) == (peeks_before, headers_before + 1)
    await assert_still_serving(deadline_relay, http)


async def test_a_silent_connection_is_cut_off(deadline_relay: RelayProcess,
                                              http: aiohttp.ClientSession) -> None:
    peeks_before, headers_before = await way_in_counters(deadline_relay, http)
    elapsed, answer = await _trickle_until_closed(deadline_relay.port, b"", b"")
    assert 0.8 <= elapsed < 5.0
    assert_request_timeout(answer)
    # Nothing to route: the peek deadline answered, aiohttp never saw the connection.
    assert await way_in_counters(deadline_relay, http) == (peeks_before + 1, headers_before)
    await assert_still_serving(deadline_relay, http)


async def test_a_trickled_request_line_is_cut_off(deadline_relay: RelayProcess,
                                                  http: aiohttp.ClientSession) -> None:
    peeks_before, headers_before = await way_in_counters(deadline_relay, http)
    elapsed, answer = await _trickle_until_closed(
        deadline_relay.port, b"GET /ws?session=", b"a" * 60)  # never a complete line
    assert 0.8 <= elapsed < 5.0
    assert_request_timeout(answer)
    assert await way_in_counters(deadline_relay, http) == (peeks_before + 1, headers_before)
    await assert_still_serving(deadline_relay, http)


async def test_a_late_request_line_does_not_extend_the_deadline(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(handshake_timeout_s=2, admin_port=free_port(), admin_key=ADMIN_KEY)
    peeks_before, _ = await way_in_counters(relay, http)
    # The request line completes at 1.2 s, within the peek deadline; headers trickle after.
    elapsed, _ = await _trickle_until_closed(
        relay.port, b"GET /healthz HTTP/1.1\r", b"\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60,
        first_gap_s=1.2)
    assert (await way_in_counters(relay, http))[0] == peeks_before  # the line was routed
    assert elapsed < 2.6  # about handshake_timeout_s after the connection was accepted


# --- invalid WebSocket frames after a proper hello -----------------------------------------


async def _joined_raw(relay: RelayProcess) -> tuple[RawWebSocket, str]:
    session_id = unique_session("raw")
    ws = await RawWebSocket.connect(
        relay.port, f"/ws?session={session_id}&token={relay.mint(session_id)}")
    await ws.send(ws_frame(0x1, client_hello(session_id, "host", "raw-h").encode()))
    fin, opcode, payload = await ws.read_frame()
    assert (fin, opcode) == (True, 0x1)
    assert json.loads(payload)["type"] == "server_hello"
    return ws, session_id


def _relay_frame(payload: bytes = b"hi") -> bytes:
    return struct.pack(">BBHI", 1, 1, len(payload), 1) + payload


INVALID_FRAMES: dict[str, tuple[bytes, set[int]]] = {
    "rsv1-without-extension": (ws_frame(0x2, _relay_frame(), rsv=4), {1002, 4000}),
    "rsv3": (ws_frame(0x2, _relay_frame(), rsv=1), {1002, 4000}),
    "fragmented-ping": (ws_frame(0x9, b"p", fin=False), {1002, 4000}),
    "ping-over-125-bytes": (ws_frame(0x9, bytes(126)), {1002, 4000}),
    "reserved-opcode-3": (ws_frame(0x3, b"x"), {1002, 4000}),
    "reserved-control-opcode-b": (ws_frame(0xB, b""), {1002, 4000}),
    "continuation-without-start": (ws_frame(0x0, _relay_frame()), {1002, 4000}),
    "new-message-inside-fragmented-one": (
        ws_frame(0x2, _relay_frame()[:4], fin=False) + ws_frame(0x2, b"x"), {1002, 4000}),
    "close-code-999": (ws_frame(0x8, struct.pack(">H", 999)), {1002, 4000}),
    "close-with-one-byte": (ws_frame(0x8, b"\x03"), {1002, 4000}),
    "text-not-utf8": (ws_frame(0x1, b"\xff\xfe"), {1007, 1003, 4000}),
}


@pytest.mark.parametrize("case", list(INVALID_FRAMES))
async def test_an_invalid_websocket_frame_is_a_protocol_error(
        relay: RelayProcess, http: aiohttp.ClientSession, case: str) -> None:
    data, codes = INVALID_FRAMES[case]
    ws, _ = await _joined_raw(relay)
    try:
        await ws.send(data)
        outcome = await ws.read_close()
        assert outcome is not None, "the relay dropped the connection without a close frame"
        assert outcome[0] in codes, outcome
        await ws.assert_eof()
    finally:
        await ws.aclose()
    await wait_for_connections(relay, http, 0)
    await assert_still_serving(relay, http)


# RFC 6455 section 5.1: a server must close the connection on an unmasked client frame.
async def test_an_unmasked_client_frame_is_a_protocol_error(relay: RelayProcess) -> None:
    ws, _ = await _joined_raw(relay)
    try:
        await ws.send(ws_frame(0x2, _relay_frame(), masked=False))
        async with asyncio.timeout(1.5):  # a frame passed on is answered at once
            outcome = await ws.read_close()
        assert outcome is not None and outcome[0] in (1002, 4000), outcome
    finally:
        await ws.aclose()


async def test_a_peer_that_vanishes_mid_frame_frees_its_slot(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    ws, _ = await _joined_raw(relay)
    frame = ws_frame(0x2, _relay_frame(bytes(1000)))
    await ws.send(frame[:500])  # half a frame, then the TCP connection goes away
    await ws.aclose()
    await wait_for_connections(relay, http, 0)
    await assert_still_serving(relay, http)
