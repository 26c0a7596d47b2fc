"""Find the session of an HTTP request from its first bytes, without consuming them.

A worker peeks (``MSG_PEEK``) at a new connection's first bytes to learn which slot owns
it before any HTTP parsing happens. Only the request line is needed: the ``session``
query parameter is what routes a connection (and a ``/v1/`` path marks a control-plane
request, which has a home slot of its own when the control plane keeps its state in
memory). The value is decoded exactly as aiohttp
decodes ``request.query`` (first occurrence, percent-decoding), so the worker that serves
the request sees the same session id the router hashed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import parse_qsl

MAX_REQUEST_LINE = 8192
"""Longer request lines are not routed; aiohttp refuses them where they land."""


class Route(enum.Enum):
    """What the peeked bytes say about routing."""

    NEED_MORE = "need_more"  # no complete request line yet
    LOCAL = "local"  # no session (health, garbage, too long): serve where it landed
    SESSION = "session"  # route by ``session``
    CONTROL = "control"  # a control-plane request (``/v1/...``)


@dataclass(frozen=True, slots=True)
class PeekResult:
    """The routing verdict; ``session`` is set only for :attr:`Route.SESSION`."""

    route: Route
    session: str | None = None


NEED_MORE = PeekResult(Route.NEED_MORE)
LOCAL = PeekResult(Route.LOCAL)
CONTROL = PeekResult(Route.CONTROL)
CONTROL_PREFIX = b"/v1/"


def route_request(data: bytes) -> PeekResult:
    """Decide the route of a connection whose first bytes are ``data``."""
    end = data.find(b"\n", 0, MAX_REQUEST_LINE)
    if end < 0:
        return NEED_MORE if len(data) < MAX_REQUEST_LINE else LOCAL
    parts = data[:end].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return LOCAL
    target = parts[1].split(b"#", 1)[0]
    if target.startswith(CONTROL_PREFIX):
        return CONTROL
    query_at = target.find(b"?")
    if query_at < 0:
        return LOCAL
    query = target[query_at + 1:]
    try:
        pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return LOCAL
    for name, value in pairs:
        if name == "session":
            return PeekResult(Route.SESSION, value) if value else LOCAL
    return LOCAL
