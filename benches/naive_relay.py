"""A deliberately naive aiohttp relay: the same-run baseline of the relay benchmarks.

Plain ``web.WebSocketResponse()``, ``async for msg in ws``, ``await peer.send_bytes`` to the
session's other side; a minimal hello, no token check, no limits, no flow control. Heartbeat
frames (kind 2) are echoed to their sender, as the real relay does, so the idle benchmark can
time them. Run: ``python benches/naive_relay.py --port P`` (it exits after ``--lifetime`` s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

import uvloop
from aiohttp import WSMsgType, web

Session = dict[str, set[web.WebSocketResponse]]
SESSIONS = web.AppKey("sessions", dict[str, Session])


async def healthz(request: web.Request) -> web.Response:
    """Answer 200 with a JSON body once the server accepts connections."""
    return web.json_response({"status": "ok", "relay": "naive"})


async def relay(request: web.Request) -> web.WebSocketResponse:
    """Upgrade, read the text hello, answer it, then forward binary frames until close."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.query.get("session", "")
    hello = await ws.receive()
    if hello.type != WSMsgType.TEXT:
        await ws.close()
        return ws
    role = "host" if json.loads(hello.data).get("role") == "host" else "participant"
    session = request.app[SESSIONS].setdefault(sid, {"host": set(), "participant": set()})
    session[role].add(ws)
    await ws.send_str(json.dumps({"type": "server_hello", "protocol_version": 1,
                                  "compression": "none", "heartbeat_s": 15}))
    targets = session["participant" if role == "host" else "host"]
    try:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            if len(msg.data) >= 2 and msg.data[1] == 2:  # heartbeat: answer the sender
                await ws.send_bytes(msg.data)
                continue
            for peer in list(targets):
                await peer.send_bytes(msg.data)
    finally:
        session[role].discard(ws)
        if not session["host"] and not session["participant"]:
            request.app[SESSIONS].pop(sid, None)
    return ws


async def serve(host: str, port: int, lifetime: float) -> None:
    """Serve until SIGTERM/SIGINT or until ``lifetime`` seconds have passed."""
    app = web.Application()
    app[SESSIONS] = {}
    app.add_routes([web.get("/healthz", healthz), web.get("/ws", relay)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    await runner.cleanup()


def main() -> None:
    """Parse the command line and run the relay on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lifetime", type=float, default=3600.0,
                        help="exit after this many seconds (safety bound)")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.lifetime))


if __name__ == "__main__":
    main()
