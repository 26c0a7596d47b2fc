"""Looking at a running relay from outside: its admin listener, its log events, its health.

Waits here poll a condition with a bounded deadline; they never assume that some time
is enough for something to happen.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

WAIT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.02


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the OS just reported free (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def admin_get(http: aiohttp.ClientSession, relay: Any, key: str | None,
                    session: str | None = None) -> tuple[int, Any]:
    """GET ``/debug/stats`` on the relay's admin listener (with ``key`` as bearer if given).

    Returns ``(status, JSON body)``; a body that is not JSON fails the calling test.
    """
    assert relay.admin_port, "this relay has no admin listener"
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    params = {"session": session} if session is not None else {}
    async with http.get(f"http://127.0.0.1:{relay.admin_port}/debug/stats", headers=headers,
                        params=params, timeout=aiohttp.ClientTimeout(total=WAIT_TIMEOUT_S)
                        ) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, await resp.json()


async def admin_stats(http: aiohttp.ClientSession, relay: Any, key: str,
                      session: str | None = None) -> dict[str, Any]:
    """Return the ``/debug/stats`` body, asserting a 200 answer."""
    status, body = await admin_get(http, relay, key, session)
    assert status == 200, body
    assert isinstance(body, dict), body
    return body


async def wait_until(check: Callable[[], Awaitable[Any]], what: str,
                     within_s: float = WAIT_TIMEOUT_S) -> Any:
    """Call ``check`` until it returns something truthy; return that, or fail after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < deadline, f"timed out after {within_s}s waiting for {what}"
        await asyncio.sleep(POLL_INTERVAL_S)


def find_log(relay: Any, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The relay's log records named ``event`` whose fields equal ``fields``."""
    return [r for r in relay.events(event)
            if all(r.get(name) == value for name, value in fields.items())]


async def wait_for_log(relay: Any, event: str, within_s: float = WAIT_TIMEOUT_S,
                       **fields: Any) -> dict[str, Any]:
    """Wait for a log record named ``event`` with ``fields``; return the first one."""

    async def check() -> dict[str, Any] | None:
        found = find_log(relay, event, **fields)
        return found[0] if found else None

    record: dict[str, Any] = await wait_until(check, f"log event {event} {fields}", within_s)
    return record


async def wait_for_exit(relay: Any, within_s: float) -> int:
    """Wait (without blocking the loop) for the relay process to exit; return its status."""
    return int(await asyncio.to_thread(relay.proc.wait, within_s))
