"""A hostile relay for tests: a WebSocket proxy in front of the real one that alters a frame.

Clients connect to the proxy exactly as to the relay (same path, query and headers); it
opens the same connection upstream and pumps messages both ways. Toward one role's
connections it can flip a bit in, drop, or replay the ``nth`` data frame (kind 1) it
forwards, or flip a bit in the ``nth`` ack (kind 4). Everything else passes unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web

from rescue.frames import HEADER_SIZE, Kind

Attack = Literal["flip", "drop", "replay", "flip-ack"]


@dataclass
class TamperPlan:
    """Which frame toward which role to alter, and how; ``done`` once it happened."""

    attack: Attack
    role: str  # the receiving role whose incoming frames are altered
    nth: int  # 1-based index among the frames of the attacked kind
    seen: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TamperingRelay:
    """The proxy server; ``url`` is what clients use instead of the relay's ``/ws``."""

    def __init__(self, upstream_port: int, plan: TamperPlan) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}/ws"
        self.plan = plan
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        try:
            upstream = await self._http.ws_connect(self.upstream, params=request.query,
                                                   headers=headers, autoping=True)
        except aiohttp.WSServerHandshakeError as e:
            return web.json_response({"error": "upstream", "detail": e.message},
                                     status=e.status, headers=e.headers)
        client = web.WebSocketResponse(autoping=True, max_msg_size=1 << 20)
        await client.prepare(request)
        role: list[str] = []
        up = asyncio.create_task(self._pump_up(client, upstream, role))
        try:
            await self._pump_down(upstream, client, role)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up
            await upstream.close()
            await client.close()
        return client

    async def _pump_up(self, client: web.WebSocketResponse,
                       upstream: aiohttp.ClientWebSocketResponse, role: list[str]) -> None:
        async for msg in client:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if not role:
                    with contextlib.suppress(ValueError, KeyError):
                        role.append(json.loads(msg.data)["role"])
                await upstream.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await upstream.send_bytes(msg.data)
        await upstream.close()

    async def _pump_down(self, upstream: aiohttp.ClientWebSocketResponse,
                         client: web.WebSocketResponse, role: list[str]) -> None:
        async for msg in upstream:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await client.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                for out in self._alter(bytes(msg.data), role[0] if role else ""):
                    await client.send_bytes(out)

    def _alter(self, data: bytes, role: str) -> list[bytes]:
        plan = self.plan
        kind = Kind.ACK if plan.attack == "flip-ack" else Kind.DATA
        if plan.done.is_set() or role != plan.role or len(data) <= HEADER_SIZE \
                or data[1] != kind:
            return [data]
        plan.seen += 1
        if plan.seen != plan.nth:
            return [data]
        plan.done.set()
        if plan.attack in ("flip", "flip-ack"):
            flipped = bytearray(data)
            flipped[-1] ^= 0x01
            return [bytes(flipped)]
        if plan.attack == "drop":
            return []
        return [data, data]  # replay
