"""Tests for rescue.server.connection: the WsConnection protocol on a fake transport, take_over
on a fake aiohttp request, and one upgrade through aiohttp's real request handler."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiohttp import web

from rescue.codes import CloseCode
from rescue.server.connection import WsConnection, detached, take_over
from rescue.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT
from rescue.wshandshake import check_upgrade, switching_protocols
from rescue.wsreader import ReadError

LIMIT = 1 << 20
MASK = b"\x5a\x0f\xc3\x81"
T = TypeVar("T")
BOUND_S = 5.0  # an upper bound for anything that should happen at once


async def started(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``coro`` as a task up to its first suspension; fail if it did not suspend."""
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)  # one turn of the loop: the task's first step, no timing
    assert not task.done(), "expected it to wait"
    return task


# --- frames ---------------------------------------------------------------------------------

def client_frame(opcode: int, payload: bytes = b"", *, masked: bool = True) -> bytes:
    """One final client frame (masked unless told otherwise), RFC 6455 section 5.2."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, bit | 127, n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def client_close(code: int = 1000, reason: bytes = b"") -> bytes:
    return client_frame(OP_CLOSE, struct.pack(">H", code) + reason)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked, unfragmented server frames into (opcode, payload)."""
    frames = []
    while data:
        first, second = data[0], data[1]
        assert first & 0x80 and not first & 0x70 and not second & 0x80
        n, pos = second & 0x7F, 2
        if n == 126:
            (n,), pos = struct.unpack_from(">H", data, 2), 4
        elif n == 127:
            (n,), pos = struct.unpack_from(">Q", data, 2), 10
        assert len(data) >= pos + n, "truncated frame"
        frames.append((first & 0x0F, data[pos:pos + n]))
        data = data[pos + n:]
    return frames


def parse_close(payload: bytes) -> tuple[int, bytes]:
    (code,) = struct.unpack_from(">H", payload)
    return code, payload[2:]


# --- fakes ----------------------------------------------------------------------------------

class FakeTransport:
    """Records what the protocol does to its transport; hooks let a test act as the client."""

    def __init__(self, log: list[tuple[Any, ...]] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = [] if log is None else log
        self.written: list[bytes] = []
        self.closing = False
        self.buffer_size = 0
        self.protocol: Any = None
        self.aborted = asyncio.Event()
        self.on_resume: Callable[[], object] | None = None
        self.on_write: Callable[[bytes], None] | None = None

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))
        self.written.append(bytes(data))
        if self.on_write is not None:
            self.on_write(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading",))

    def resume_reading(self) -> None:
        self.calls.append(("resume_reading",))
        if self.on_resume is not None:
            self.on_resume()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append(("close",))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort",))
        self.closing = True
        self.aborted.set()

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append(("set_write_buffer_limits", high, low))

    def set_protocol(self, protocol: Any) -> None:
        self.calls.append(("set_protocol", protocol))
        self.protocol = protocol

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def reading_calls(self) -> list[str]:
        return [name for name in self.names() if name in ("pause_reading", "resume_reading")]


class FakeRelay:
    """Records the callbacks a connection makes; ``hook`` runs inside ``on_message``."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.hook: Callable[[int, bytes], None] | None = None

    def on_message(self, peer: Any, opcode: int, data: bytes) -> None:
        self.events.append(("message", peer, opcode, data))
        if self.hook is not None:
            self.hook(opcode, data)

    def on_read_error(self, peer: Any, error: ReadError) -> None:
        self.events.append(("read_error", peer, error))

    def on_internal_error(self, peer: Any) -> None:
        self.events.append(("internal_error", peer))

    def messages(self) -> list[tuple[int, bytes]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "message"]


class FakePeer:
    """The part of rescue.server.peer.Peer a WsConnection touches."""

    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.closing = False
        self.closes: list[tuple[CloseCode, str]] = []

    def close(self, code: CloseCode, reason: str) -> None:
        self.closes.append((code, reason))
        self.closing = True


class FakeHandler:
    """aiohttp's RequestHandler as take_over uses it: a payload-parser slot and a transport."""

    def __init__(self, transport: FakeTransport, tail: bytes,
                 log: list[tuple[Any, ...]]) -> None:
        self.transport: Any = transport
        self.tail = tail
        self.log = log
        self.parser: Any = None
        self.transport_when_lost: Any = "not called"

    def set_parser(self, parser: Any) -> None:
        self.log.append(("set_parser", parser))
        self.parser = parser
        if self.tail:
            parser.feed_data(self.tail)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.log.append(("connection_lost", exc))
        self.transport_when_lost = self.transport
        if self.parser is not None:
            self.parser.feed_eof()


class FakeRequest:
    def __init__(self, transport: FakeTransport | None, protocol: FakeHandler) -> None:
        self.transport = transport
        self.protocol = protocol


def fake_request(tail: bytes = b"") -> tuple[FakeRequest, FakeTransport, FakeHandler]:
    log: list[tuple[Any, ...]] = []
    transport = FakeTransport(log)
    handler = FakeHandler(transport, tail, log)
    return FakeRequest(transport, handler), transport, handler


def new_conn() -> tuple[WsConnection, FakeTransport]:
    transport = FakeTransport()
    conn = WsConnection(transport, LIMIT)  # type: ignore[arg-type]
    return conn, transport


def upgraded_conn(tail: bytes = b"") -> tuple[WsConnection, FakeTransport]:
    """A connection just taken over from (fake) aiohttp, which had read ``tail`` past the
    upgrade request."""
    request, transport, _ = fake_request(tail)
    conn = take_over(request, switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),  # type: ignore[arg-type]
                     LIMIT)
    assert conn is not None
    return conn, transport


async def attached_conn() -> tuple[WsConnection, FakeTransport, FakeRelay, FakePeer]:
    """A connection past its hello, with a fake peer attached; the transport log cleared."""
    conn, transport = new_conn()
    conn.data_received(client_frame(OP_TEXT, b"hello"))
    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hello")
    relay = FakeRelay()
    peer = FakePeer(relay)
    conn.attach(peer)  # type: ignore[arg-type]
    transport.calls.clear()
    return conn, transport, relay, peer


# --- the hello ------------------------------------------------------------------------------

async def test_messages_fed_with_the_upgrade_are_the_hello_and_the_rest_wait_for_attach() -> None:
    tail = (client_frame(OP_TEXT, b"hello") + client_frame(OP_BINARY, b"one")
            + client_frame(OP_BINARY, b"two"))
    conn, transport = upgraded_conn(tail)
    assert transport.reading_calls() == ["pause_reading"]

    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hello")
    # The hello was already there: the connection never read from the socket again.
    assert "resume_reading" not in transport.names()
    assert conn.held

    conn.data_received(client_frame(OP_BINARY, b"three"))  # the socket may still deliver
    relay = FakeRelay()
    peer = FakePeer(relay)
    assert relay.events == []
    conn.attach(peer)  # type: ignore[arg-type]
    assert relay.messages() == [(OP_BINARY, b"one"), (OP_BINARY, b"two"),
                                (OP_BINARY, b"three")]
    assert all(event[1] is peer for event in relay.events)
    assert transport.reading_calls()[-1] == "resume_reading"
    assert not conn.held


async def test_first_message_resumes_reading_when_nothing_was_fed() -> None:
    conn, transport = upgraded_conn()
    assert transport.reading_calls() == ["pause_reading"]
    loop = asyncio.get_running_loop()
    # The client's hello arrives once the connection reads the socket again.
    transport.on_resume = lambda: loop.call_soon(
        conn.data_received, client_frame(OP_TEXT, b"hello") + client_frame(OP_BINARY, b"x"))

    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hello")
    # Resumed for the hello, then held again until the peer is attached.
    assert transport.reading_calls() == ["pause_reading", "resume_reading", "pause_reading"]

    transport.on_resume = None
    relay = FakeRelay()
    conn.attach(FakePeer(relay))  # type: ignore[arg-type]
    assert relay.messages() == [(OP_BINARY, b"x")]
    assert transport.reading_calls()[-1] == "resume_reading"


async def test_a_hello_split_between_the_upgrade_tail_and_the_socket_is_joined() -> None:
    hello = client_frame(OP_TEXT, b"h" * 300)  # a 16-bit length form
    conn, transport = upgraded_conn(hello[:3])
    loop = asyncio.get_running_loop()
    pieces = [hello[3:9], hello[9:200], hello[200:]]

    def client_sends() -> None:
        for piece in pieces:
            loop.call_soon(conn.data_received, piece)

    transport.on_resume = client_sends
    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"h" * 300)


async def test_a_framing_error_before_the_hello_is_returned_by_first_message() -> None:
    conn, _ = upgraded_conn(client_frame(OP_TEXT, b"hello", masked=False))
    first = await conn.first_message(BOUND_S)
    assert isinstance(first, ReadError)
    assert first.close_code is CloseCode.PROTOCOL_ERROR
    assert "unmasked" in first.detail


async def test_a_framing_error_while_first_message_waits_is_returned() -> None:
    conn, transport = upgraded_conn()
    loop = asyncio.get_running_loop()
    # A text frame with all three reserved bits set: broken framing, whatever follows.
    transport.on_resume = lambda: loop.call_soon(conn.data_received, b"\xf1\x80" + MASK)
    first = await conn.first_message(BOUND_S)
    assert isinstance(first, ReadError)
    assert first.close_code is CloseCode.PROTOCOL_ERROR


async def test_connection_lost_while_first_message_waits_returns_none() -> None:
    conn, transport = upgraded_conn()
    loop = asyncio.get_running_loop()
    transport.on_resume = lambda: loop.call_soon(conn.connection_lost, None)
    assert await conn.first_message(BOUND_S) is None
    assert conn.lost


async def test_connection_lost_before_first_message_returns_none() -> None:
    conn, transport = upgraded_conn(client_frame(OP_TEXT, b"hel")[:4])  # half a hello
    conn.connection_lost(ConnectionResetError())
    assert await conn.first_message(BOUND_S) is None
    assert "resume_reading" not in transport.names()  # nothing to read from a lost socket


async def test_first_message_times_out_when_nothing_arrives() -> None:
    conn, _ = upgraded_conn()
    with pytest.raises(TimeoutError):
        await conn.first_message(0.05)


# --- handing messages on --------------------------------------------------------------------

async def test_hold_in_on_message_keeps_the_next_frame_until_release() -> None:
    conn, transport, relay, _ = await attached_conn()
    relay.hook = lambda opcode, data: conn.hold() if data == b"one" else None

    conn.data_received(client_frame(OP_BINARY, b"one") + client_frame(OP_BINARY, b"two"))
    assert relay.messages() == [(OP_BINARY, b"one")]
    assert transport.reading_calls() == ["pause_reading"]

    conn.data_received(client_frame(OP_BINARY, b"three"))  # bytes already in flight wait too
    assert relay.messages() == [(OP_BINARY, b"one")]

    conn.release()
    assert relay.messages() == [(OP_BINARY, b"one"), (OP_BINARY, b"two"),
                                (OP_BINARY, b"three")]
    assert transport.reading_calls() == ["pause_reading", "resume_reading"]


async def test_release_does_not_resume_reading_if_a_message_held_again() -> None:
    conn, transport, relay, _ = await attached_conn()
    relay.hook = lambda opcode, data: conn.hold()  # every message holds

    conn.data_received(b"".join(client_frame(OP_BINARY, bytes([i])) for i in range(3)))
    assert relay.messages() == [(OP_BINARY, b"\x00")]
    conn.release()
    assert relay.messages() == [(OP_BINARY, b"\x00"), (OP_BINARY, b"\x01")]
    assert conn.held
    assert transport.reading_calls() == ["pause_reading", "pause_reading"]
    conn.release()
    assert relay.messages()[-1] == (OP_BINARY, b"\x02")
    assert "resume_reading" not in transport.reading_calls()
    relay.hook = None
    conn.release()  # nothing left: now reading resumes
    assert transport.reading_calls()[-1] == "resume_reading"
    assert len(relay.messages()) == 3


async def test_release_when_not_held_does_nothing() -> None:
    conn, transport, _, _ = await attached_conn()
    conn.release()
    assert transport.calls == []


@pytest.mark.parametrize("size", [5, 300, 70_000])
async def test_a_frame_split_over_several_reads_is_delivered_once_complete(size: int) -> None:
    conn, _, relay, _ = await attached_conn()
    payload = bytes(i % 251 for i in range(size))
    frame = client_frame(OP_BINARY, payload)
    cuts = sorted({0, 1, 2, 3, 7, len(frame) // 2, len(frame) - 1, len(frame)})
    for a, b in itertools.pairwise(cuts):
        assert relay.messages() == []
        conn.data_received(frame[a:b])
    assert relay.messages() == [(OP_BINARY, payload)]


async def test_control_frames_are_handed_on_too() -> None:
    conn, _, relay, _ = await attached_conn()
    conn.data_received(client_frame(OP_PING, b"p") + client_close(1000, b"bye"))
    assert relay.messages() == [(OP_PING, b"p"), (OP_CLOSE, b"\x03\xe8bye")]


async def test_a_framing_error_after_attach_goes_to_on_read_error_and_stops() -> None:
    conn, _, relay, peer = await attached_conn()
    conn.data_received(client_frame(OP_BINARY, b"ok") + client_frame(OP_BINARY, b"x", masked=False)
                       + client_frame(OP_BINARY, b"after"))
    conn.data_received(client_frame(OP_BINARY, b"later"))
    assert [e[0] for e in relay.events] == ["message", "read_error"]
    _, who, error = relay.events[1]
    assert who is peer
    assert isinstance(error, ReadError)
    assert error.close_code is CloseCode.PROTOCOL_ERROR


async def test_a_too_big_message_is_a_read_error_with_1009() -> None:
    transport = FakeTransport()
    conn = WsConnection(transport, 10)  # type: ignore[arg-type]
    conn.data_received(client_frame(OP_TEXT, b"hi"))
    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hi")
    relay = FakeRelay()
    conn.attach(FakePeer(relay))  # type: ignore[arg-type]
    conn.data_received(client_frame(OP_BINARY, b"x" * 11))
    assert [e[0] for e in relay.events] == ["read_error"]
    assert relay.events[0][2].close_code is CloseCode.MESSAGE_TOO_BIG


async def test_an_exception_in_on_message_is_an_internal_error_and_stops_delivery() -> None:
    conn, _, relay, peer = await attached_conn()

    def fail(opcode: int, data: bytes) -> None:
        raise RuntimeError("bug")

    relay.hook = fail
    conn.data_received(client_frame(OP_BINARY, b"one") + client_frame(OP_BINARY, b"two"))
    conn.data_received(client_frame(OP_BINARY, b"three"))
    assert [e[:2] for e in relay.events] == [("message", peer), ("internal_error", peer)]
    assert relay.messages() == [(OP_BINARY, b"one")]


async def test_connection_lost_after_attach_closes_the_peer() -> None:
    conn, _, _, peer = await attached_conn()
    conn.connection_lost(None)
    assert peer.closes == [(CloseCode.NORMAL, "closed")]
    assert conn.lost


async def test_connection_lost_after_attach_leaves_a_closing_peer_alone() -> None:
    conn, _, _, peer = await attached_conn()
    peer.closing = True
    conn.connection_lost(ConnectionResetError())
    assert peer.closes == []


async def test_a_lost_connection_does_not_touch_reading() -> None:
    conn, transport, relay, _ = await attached_conn()
    conn.connection_lost(None)
    relay.hook = lambda opcode, data: conn.hold()
    conn.data_received(client_frame(OP_BINARY, b"x") + client_frame(OP_BINARY, b"y"))
    conn.release()
    assert transport.reading_calls() == []


# --- writing flow control -------------------------------------------------------------------

async def test_pause_and_resume_writing_set_writing_paused() -> None:
    conn, _ = new_conn()
    assert not conn.writing_paused
    conn.pause_writing()
    assert conn.writing_paused
    conn.resume_writing()
    assert not conn.writing_paused


async def test_wait_writable_returns_when_writing_resumes() -> None:
    conn, _ = new_conn()
    conn.pause_writing()
    waiting = await started(conn.wait_writable(30.0))
    conn.resume_writing()
    await asyncio.wait_for(waiting, BOUND_S)
    assert not conn.writing_paused


async def test_wait_writable_returns_at_its_timeout_when_still_paused() -> None:
    conn, _ = new_conn()
    conn.pause_writing()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(conn.wait_writable(0.05), BOUND_S)
    assert loop.time() - started >= 0.04
    assert conn.writing_paused


async def test_wait_writable_returns_at_once_when_not_paused() -> None:
    conn, _ = new_conn()
    await asyncio.wait_for(conn.wait_writable(30.0), BOUND_S)  # not its 30 s


async def test_wait_writable_returns_when_the_connection_is_lost_or_closing() -> None:
    conn, _ = new_conn()
    conn.pause_writing()
    waiting = await started(conn.wait_writable(30.0))
    conn.connection_lost(None)
    await asyncio.wait_for(waiting, BOUND_S)

    conn, _ = new_conn()
    conn.pause_writing()
    waiting = await started(conn.wait_writable(30.0))
    conn.send_close(CloseCode.GOING_AWAY)
    await asyncio.wait_for(waiting, BOUND_S)
    assert conn.writing_paused



# --- closing --------------------------------------------------------------------------------

def close_frames(transport: FakeTransport) -> list[tuple[int, bytes]]:
    return [parse_close(payload) for data in transport.written
            for opcode, payload in server_frames(data) if opcode == OP_CLOSE]


def on_close_frame(transport: FakeTransport, callback: Callable[..., None], *args: Any) -> None:
    """Act as the client: run ``callback(*args)`` soon after our close frame is written."""
    loop = asyncio.get_running_loop()

    def written(data: bytes) -> None:
        if any(opcode == OP_CLOSE for opcode, _ in server_frames(data)):
            loop.call_soon(callback, *args)

    transport.on_write = written


async def test_close_sends_one_close_frame_and_returns_on_the_clients_answer() -> None:
    conn, transport, relay, _ = await attached_conn()
    conn.hold()  # e.g. waiting for its receivers to drain
    # The client still sends data, then answers our close.
    on_close_frame(transport, conn.data_received,
                   client_frame(OP_BINARY, b"late") + client_close(1000))
    await asyncio.wait_for(conn.close(CloseCode.SLOW_CONSUMER, 30.0), BOUND_S)  # not 30 s

    assert close_frames(transport) == [(4005, b"SLOW_CONSUMER")]
    assert len(transport.written) == 1
    assert conn.close_received
    names = transport.names()
    assert names.index("resume_reading") < names.index("close")  # the answer could arrive
    assert names[-1] == "close"
    assert relay.messages() == []  # a data frame after our close is dropped
    assert not transport.aborted.is_set()


async def test_close_without_an_answer_returns_after_the_timeout_and_closes() -> None:
    conn, transport, relay, _ = await attached_conn()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(conn.close(CloseCode.IDLE_TIMEOUT, 0.05), BOUND_S)
    assert loop.time() - started >= 0.04
    assert close_frames(transport) == [(4006, b"IDLE_TIMEOUT")]
    assert transport.names()[-1] == "close"
    assert "abort" not in transport.names()
    conn.data_received(client_frame(OP_BINARY, b"late"))
    assert relay.messages() == []


async def test_close_aborts_later_when_the_write_buffer_does_not_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    conn, transport, _, _ = await attached_conn()
    transport.buffer_size = 1 << 20  # a receiver that stopped reading
    loop = asyncio.get_running_loop()
    scheduled: list[tuple[float, Any]] = []
    real_call_later = loop.call_later

    def spy(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        scheduled.append((delay, callback))
        return real_call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", spy)
    await asyncio.wait_for(conn.close(CloseCode.SLOW_CONSUMER, 0.05), BOUND_S)
    assert transport.names()[-1] == "close"
    assert (0.05, transport.abort) in scheduled
    await asyncio.wait_for(transport.aborted.wait(), BOUND_S)


async def test_close_with_an_empty_buffer_schedules_no_abort(
        monkeypatch: pytest.MonkeyPatch) -> None:
    conn, transport, _, _ = await attached_conn()
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    real_call_later = loop.call_later

    def spy(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        scheduled.append(callback)
        return real_call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", spy)
    on_close_frame(transport, conn.data_received, client_close())
    await asyncio.wait_for(conn.close(CloseCode.NORMAL, 30.0), BOUND_S)
    assert transport.names()[-1] == "close"
    assert transport.abort not in scheduled


async def test_close_is_sent_once_even_when_closed_twice() -> None:
    conn, transport, _, _ = await attached_conn()
    on_close_frame(transport, conn.data_received, client_close())
    await asyncio.wait_for(asyncio.gather(conn.close(CloseCode.NORMAL, 30.0),
                                          conn.close(CloseCode.GOING_AWAY, 30.0)), BOUND_S)
    assert close_frames(transport) == [(1000, b"NORMAL")]


async def test_close_returns_when_the_connection_is_lost_meanwhile() -> None:
    conn, transport, _, peer = await attached_conn()
    peer.closing = True  # as when Peer.close started this close
    on_close_frame(transport, conn.connection_lost, None)
    await asyncio.wait_for(conn.close(CloseCode.NORMAL, 30.0), BOUND_S)
    assert close_frames(transport) == [(1000, b"NORMAL")]
    assert "close" not in transport.names()  # the transport is already gone
    assert peer.closes == []


async def test_close_during_the_hello_writes_no_frame_to_a_lost_connection() -> None:
    conn, transport = upgraded_conn()
    conn.connection_lost(None)
    transport.calls.clear()
    await asyncio.wait_for(conn.close(CloseCode.HANDSHAKE_TIMEOUT, 30.0), BOUND_S)
    assert transport.calls == []


async def test_a_framing_error_while_closing_ends_the_wait() -> None:
    conn, transport, relay, _ = await attached_conn()
    on_close_frame(transport, conn.data_received, client_frame(OP_BINARY, b"x", masked=False))
    await asyncio.wait_for(conn.close(CloseCode.NORMAL, 30.0), BOUND_S)
    assert conn.close_received
    assert relay.events == []  # nothing is reported for a connection being closed
    assert transport.names()[-1] == "close"


# --- take_over ------------------------------------------------------------------------------

async def test_take_over_writes_the_101_and_moves_the_transport_to_the_connection() -> None:
    response = switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    tail = client_frame(OP_TEXT, b"hello") + client_frame(OP_BINARY, b"next")
    request, transport, handler = fake_request(tail)

    conn = take_over(request, response, LIMIT)  # type: ignore[arg-type]
    assert conn is not None
    assert conn.transport is transport  # type: ignore[comparison-overlap]
    names = transport.names()
    assert transport.calls[0] == ("write", response)  # the 101 before anything else
    assert ("set_protocol", conn) in transport.calls
    assert ("set_parser", conn) in transport.calls
    assert names.index("set_protocol") < names.index("connection_lost")
    assert handler.transport is None
    assert handler.transport_when_lost is None  # cleared BEFORE connection_lost
    assert names.count("connection_lost") == 1
    assert transport.reading_calls()[-1] == "pause_reading"
    assert "close" not in names and "abort" not in names

    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hello")
    relay = FakeRelay()
    conn.attach(FakePeer(relay))  # type: ignore[arg-type]
    assert relay.messages() == [(OP_BINARY, b"next")]


async def test_take_over_without_a_tail_waits_for_the_socket() -> None:
    request, transport, _ = fake_request()
    conn = take_over(request, b"HTTP/1.1 101 x\r\n\r\n", LIMIT)  # type: ignore[arg-type]
    assert conn is not None
    loop = asyncio.get_running_loop()
    transport.on_resume = lambda: loop.call_soon(conn.data_received,
                                                 client_frame(OP_TEXT, b"hi"))
    assert await conn.first_message(BOUND_S) == (OP_TEXT, b"hi")


async def test_take_over_of_a_closing_transport_returns_none() -> None:
    request, transport, handler = fake_request(client_frame(OP_TEXT, b"hello"))
    transport.closing = True
    assert take_over(request, b"HTTP/1.1 101 x\r\n\r\n", LIMIT) is None  # type: ignore[arg-type]
    assert transport.calls == []
    assert handler.transport is transport

    request = FakeRequest(None, handler)
    assert take_over(request, b"HTTP/1.1 101 x\r\n\r\n", LIMIT) is None  # type: ignore[arg-type]


# --- through aiohttp's real request handler -------------------------------------------------

class EchoPeer(FakePeer):
    """Answers each text message with ``echo:<text>``; ``lost`` resolves when it is closed."""

    def __init__(self, conn: WsConnection) -> None:
        super().__init__(FakeRelay())
        self.relay.hook = lambda opcode, data: conn.transport.write(
            bytes((0x81, 5 + len(data))) + b"echo:" + data)
        self.lost: asyncio.Future[tuple[CloseCode, str]] = (
            asyncio.get_running_loop().create_future())

    def close(self, code: CloseCode, reason: str) -> None:
        super().close(code, reason)
        if not self.lost.done():
            self.lost.set_result((code, reason))


@contextlib.asynccontextmanager
async def serve(handler: Callable[[web.Request], Any]) -> AsyncIterator[web.AppRunner]:
    """Serve ``handler`` at ``/ws`` on 127.0.0.1, an OS-chosen port."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    assert not head[1] & 0x80 and head[1] & 0x7F < 126
    return head[0] & 0x0F, await reader.readexactly(head[1] & 0x7F)


async def test_take_over_through_aiohttp_with_a_pipelined_first_frame() -> None:
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    aiohttp_tasks: list[asyncio.Task[Any]] = []
    peers: list[EchoPeer] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        aiohttp_tasks.append(request.task)  # the handler's connection loop (start())
        accept = check_upgrade(request.method, request.headers)
        conn = take_over(request, switching_protocols(accept), LIMIT)
        assert conn is not None
        first = await conn.first_message(BOUND_S)
        got.set_result(first)
        assert isinstance(first, tuple)
        conn.transport.write(bytes((0x81, 6 + len(first[1]))) + b"first:" + first[1])
        peer = EchoPeer(conn)
        peers.append(peer)
        conn.attach(peer)  # type: ignore[arg-type]
        return detached()

    key = "dGhlIHNhbXBsZSBub25jZQ=="
    request = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Key: {key}\r\n\r\n").encode()
    async with serve(handle) as runner:
        assert runner.server is not None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", runner.addresses[0][1]), BOUND_S)
        try:
            writer.write(request + client_frame(OP_TEXT, b"hello"))  # pipelined
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
            assert head == switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            assert await asyncio.wait_for(got, BOUND_S) == (OP_TEXT, b"hello")
            assert await asyncio.wait_for(read_server_frame(reader), BOUND_S) == (
                OP_TEXT, b"first:hello")

            # aiohttp has finished with the request and forgotten the connection...
            done, _ = await asyncio.wait(aiohttp_tasks, timeout=BOUND_S)
            assert done == set(aiohttp_tasks)
            assert all(task.exception() is None for task in done)
            assert runner.server.connections == []
            # ...without closing it: the connection still carries frames both ways.
            writer.write(client_frame(OP_TEXT, b"again"))
            assert await asyncio.wait_for(read_server_frame(reader), BOUND_S) == (
                OP_TEXT, b"echo:again")
            assert peers[0].relay.messages() == [(OP_TEXT, b"again")]
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), BOUND_S)
        # The client going away reaches the peer through the taken-over protocol.
        assert await asyncio.wait_for(peers[0].lost, BOUND_S) == (CloseCode.NORMAL, "closed")
