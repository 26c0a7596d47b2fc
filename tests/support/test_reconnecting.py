"""ReconnectingPeer.stop() of tests/support/reconnecting.py: the cancel it sends ends the
peer's task wherever it lands, and never turns into a reconnect.

The peers talk to a tiny in-process WebSocket server (not the relay): it answers the hello
and can close a connection with 1012, which sends the peer into its reconnect path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.support.reconnecting import RESTART_CLOSE, ReconnectingPeer

BOUND_S = 5.0  # every wait in these tests


class HelloServer:
    """Answers a client_hello with a server_hello; :meth:`restart_all` closes with 1012."""

    def __init__(self) -> None:
        self.open: list[web.WebSocketResponse] = []
        self.accepted = 0
        self.got_frame = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = await ws.receive(timeout=BOUND_S)
        if hello.type is aiohttp.WSMsgType.TEXT \
                and json.loads(hello.data)["type"] == "client_hello":
            self.accepted += 1
            await ws.send_str(json.dumps({"type": "server_hello",
                                          "connection_id": f"c{next(self._ids)}"}))
            self.open.append(ws)
            async for msg in ws:  # frames: note and drop
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self.got_frame.set()
            self.open.remove(ws)
        return ws

    async def restart_all(self) -> None:
        """Close every open connection with 1012 (as a relay restart does)."""
        await asyncio.gather(*(ws.close(code=RESTART_CLOSE, message=b"SERVER_SHUTDOWN")
                               for ws in list(self.open)))

    # the two methods ReconnectingPeer asks of a relay
    def mint(self, session_id: str) -> str:
        return "token"

    def ws_url(self, session_id: str, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/ws?session={session_id}&token={token}"


@pytest.fixture
async def server() -> AsyncIterator[HelloServer]:
    srv = HelloServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


class SlowSenderPeer(ReconnectingPeer):
    """A peer whose sender, once cancelled, takes until :attr:`release` to end: the run
    loop is then held waiting for it, which is where a stop()'s cancel used to be lost."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sender_ending = asyncio.Event()
        self.release = asyncio.Event()
        self.senders: list[asyncio.Task[object]] = []

    async def _send_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.senders.append(task)
        try:
            await super()._send_loop(ws)
        finally:
            self.sender_ending.set()
            await self.release.wait()


class CancelAsErrorPeer(ReconnectingPeer):
    """A peer whose reconnect attempts turn a cancel into a ConnectionError, as a library
    racing its own timeout against a cancel can do."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.attempting = asyncio.Event()

    async def _join_once(self) -> aiohttp.ClientWebSocketResponse:
        if self.connects == 0:
            return await super()._join_once()
        self.attempting.set()
        try:
            await asyncio.Event().wait()  # an attempt that hangs until cancelled
        except asyncio.CancelledError:
            raise ConnectionError("cancel turned into an error") from None
        raise AssertionError("unreachable")


async def test_stop_while_the_run_loop_waits_for_its_sender_ends_the_task(
        server: HelloServer, client: aiohttp.ClientSession) -> None:
    peer = SlowSenderPeer(client, server, "s1", "host", "h1", retry_s=0.01)
    await peer.start()
    await server.restart_all()  # the run loop ends its sender and waits for it
    async with asyncio.timeout(BOUND_S):
        await peer.sender_ending.wait()
    try:
        async with asyncio.timeout(BOUND_S):
            await peer.stop()
        task = peer._task
        assert task is not None and task.cancelled()
        assert peer.reconnects == [] and peer.connects == 1 and server.accepted == 1
        assert peer.ended is None
    finally:
        peer.release.set()
        await asyncio.wait(peer.senders, timeout=BOUND_S)


async def test_stop_during_a_reconnect_whose_attempt_swallows_the_cancel_ends_the_task(
        server: HelloServer, client: aiohttp.ClientSession) -> None:
    peer = CancelAsErrorPeer(client, server, "s2", "host", "h2", retry_s=0.01)
    await peer.start()
    await server.restart_all()
    async with asyncio.timeout(BOUND_S):
        await peer.attempting.wait()
    async with asyncio.timeout(BOUND_S):
        await peer.stop()
    task = peer._task
    assert task is not None and task.cancelled()
    [record] = peer.reconnects
    assert record.cause.startswith(f"close {RESTART_CLOSE}")
    assert record.failed_attempts == ["ConnectionError: cancel turned into an error"]
    assert not record.gave_up and not record.succeeded and peer.ended is None


async def test_stop_of_an_exchanging_peer_closes_its_connection(
        server: HelloServer, client: aiohttp.ClientSession) -> None:
    peer = ReconnectingPeer(client, server, "s3", "host", "h3", send_interval_s=0.01)
    await peer.start()
    async with asyncio.timeout(BOUND_S):
        await server.got_frame.wait()
        await peer.stop()
    assert peer._task is not None and peer._task.cancelled()
    assert not peer.connected and peer.ended is None and peer.reconnects == []


async def test_stop_gives_up_on_a_task_that_ignores_its_cancel_within_the_bound(
        server: HelloServer, client: aiohttp.ClientSession) -> None:
    stubborn, running = asyncio.Event(), asyncio.Event()

    class StubbornPeer(ReconnectingPeer):
        async def _run(self) -> None:
            running.set()
            while not stubborn.is_set():
                try:
                    await stubborn.wait()
                except asyncio.CancelledError:
                    continue  # the defect stop() must survive: a swallowed cancel

    peer = StubbornPeer(client, server, "s4", "host", "h4")
    peer.stop_timeout_s = 0.2
    await peer.start()
    async with asyncio.timeout(BOUND_S):
        await running.wait()
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        with pytest.raises(TimeoutError, match="still running"):
            await peer.stop()
        assert loop.time() - began < BOUND_S
        assert not peer.connected  # the connection is closed all the same
    finally:
        stubborn.set()
        assert peer._task is not None
        await asyncio.wait({peer._task}, timeout=BOUND_S)
