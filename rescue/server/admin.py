"""The admin listener: ``/debug/stats`` behind a bearer key, never on the public port."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from rescue import metrics
from rescue.admission import bearer_matches, bearer_token
from rescue.codes import ErrorCode
from rescue.server.peer import Peer
from rescue.server.relay import Relay
from rescue.server.responses import error_response


def stats_snapshot(relay: Relay, session_id: str | None = None) -> dict[str, Any]:
    """Return the worker's counters and live state (one session's members if asked)."""
    loop_now = asyncio.get_running_loop().time()
    oldest = min((s.created_at for s in relay.registry.sessions.values()), default=None)
    body: dict[str, Any] = {
        "connections": relay.connections,
        "handshakes": relay.handshakes,
        "peers": len(relay.peers),
        "sessions": len(relay.registry),
        "oldest_session_age_s": None if oldest is None else round(loop_now - oldest, 3),
        "draining": relay.draining,
        "counters": relay.stats.as_dict(),
        "intake": None if relay.intake is None else asdict(relay.intake),
        "workers": relay.cluster,
        "total": _totals(relay.cluster),
    }
    if session_id is not None:
        session = relay.registry.get(session_id)
        body["session"] = None if session is None else {
            "members": [_member(m.conn) for m in session.members()],
            "age_s": round(loop_now - session.created_at, 3),
        }
    return body


_TOTALLED = ("connections", "peers", "sessions", "handshakes", "messages_forwarded",
             "bytes_forwarded", "accepted", "handed_off", "adopted", "handoff_failures")


def _totals(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Sum the supervisor's per-worker numbers (as of each worker's latest beat)."""
    return {name: sum(int(w.get(name) or 0) for w in workers) for name in _TOTALLED}


def _member(peer: Peer) -> dict[str, Any]:
    """One member's live state; traffic numbers only for peers that opted in to telemetry."""
    out: dict[str, Any] = {"role": peer.role, "connection_id": peer.connection_id,
                           "buffered": peer.write_buffer_size, "telemetry": peer.telemetry}
    if peer.telemetry:
        out.update(rx_msgs=peer.rx_msgs, rx_bytes=peer.rx_bytes, tx_msgs=peer.tx_msgs,
                   tx_bytes=peer.tx_bytes)
    return out


def admin_app(relay: Relay) -> web.Application:
    """Build the admin application; every request needs ``Authorization: Bearer <admin_key>``."""
    key = relay.config.admin_key.encode()

    async def debug_stats(request: web.Request) -> web.Response:
        if not key:
            return error_response(ErrorCode.NOT_ENTITLED,
                                  "admin_key is not configured; admin endpoints are disabled")
        if not bearer_matches(bearer_token(request.headers.get("Authorization")), [key]):
            return web.json_response({"error": "unauthenticated",
                                      "detail": "admin key required"}, status=401)
        return web.json_response(stats_snapshot(relay, request.query.get("session")))

    metrics_key = relay.config.metrics_key.encode()

    async def metrics_handler(request: web.Request) -> web.Response:
        if metrics_key and not bearer_matches(
                bearer_token(request.headers.get("Authorization")), [metrics_key]):
            return web.json_response({"error": "unauthenticated",
                                      "detail": "metrics key required"}, status=401)
        return web.Response(body=metrics.exposition(),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/debug/stats", debug_stats)
    app.router.add_get("/metrics", metrics_handler)
    return app
