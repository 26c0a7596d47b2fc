"""Peers a chaos test can cut off: a light protocol peer and an SDK channel, each with
:meth:`abort` that drops its TCP connection from the client side without a WebSocket close.

The abort shuts the socket down under the running transport (``SO_LINGER`` 0, then
``shutdown(SHUT_RDWR)``): the client reads EOF at once and the relay sees the connection
end without a close frame, as after a network failure. Both kinds then reconnect on
their own: :class:`ChaosPeer` at once (as :class:`ReconnectingPeer` does for a dropped
connection), :class:`AbortableChannel` with the SDK's full-jitter backoff and resume.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import aiohttp

from rescue.client.channel import Channel
from tests.support.reconnecting import ReconnectingPeer

LINGER_RESET = struct.pack("ii", 1, 0)
CONNECT_TIMEOUT_S = 10.0


def chaos_http() -> aiohttp.ClientSession:
    """A client without a pool limit whose every request (the WebSocket upgrade included,
    not the open WebSocket) must complete within :data:`CONNECT_TIMEOUT_S`, so an attempt
    that meets a dead or stopped worker fails and is retried instead of hanging."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S))


def abort_websocket(ws: aiohttp.ClientWebSocketResponse | None) -> bool:
    """Drop ``ws``'s TCP connection under it; True if there was an open one to drop."""
    if ws is None or ws.closed:
        return False
    sock = ws.get_extra_info("socket")
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False  # already gone
    return True


class ChaosPeer(ReconnectingPeer):
    """A :class:`ReconnectingPeer` whose first join is retried like a reconnect and whose
    connection a test can abort.

    A first join still failing ``give_up_s`` after the first attempt raises; the failed
    attempts before a successful one are kept in :attr:`start_failures`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_failures: list[str] = []
        self.aborts = 0
        self.stopped_at: float | None = None  # loop time stop() was called

    async def start(self) -> None:
        """Join (retrying every ``retry_s`` for up to ``give_up_s``), then exchange."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_s
        while True:
            try:
                await super().start()
                return
            except aiohttp.WSServerHandshakeError as e:
                self.start_failures.append(f"HTTP {e.status}: {e.message}")
            except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as e:
                self.start_failures.append(f"{type(e).__name__}: {e}")
            if loop.time() >= deadline:
                raise ConnectionError(f"{self.peer_id} could not join in {self.give_up_s}s: "
                                      f"{self.start_failures[-3:]}")
            await asyncio.sleep(self.retry_s)

    async def stop(self) -> None:
        """Stop (noting when, so a reconnect cut short by it is not judged a failure)."""
        if self.stopped_at is None:
            self.stopped_at = asyncio.get_running_loop().time()
        await super().stop()

    def abort(self) -> bool:
        """Drop the current connection client-side; True if one was open."""
        dropped = abort_websocket(self._ws)
        self.aborts += dropped
        return dropped


class AbortableChannel(Channel):
    """An SDK :class:`Channel` whose current connection a test can abort."""

    aborts = 0

    def abort(self) -> bool:
        """Drop the current connection client-side; True if one was open."""
        dropped = abort_websocket(self._ws)
        self.aborts += dropped
        return dropped
