"""The relay's HTTP answers before an upgrade: the contract's JSON errors, and the query.

Every refusal is ``{"error": <code>, "detail": <text>}`` with the code's status and the code
repeated in ``X-Beach-Rescue-Error``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl

from aiohttp import web

from rescue.codes import ErrorCode

#: Response header repeating the JSON body's ``error`` code on every refusal.
ERROR_HEADER = "X-Beach-Rescue-Error"


def error_response(error: ErrorCode, detail: str,
                   retry_after_s: int | None = None) -> web.Response:
    """Build the contract's JSON error response (the code also in ``X-Beach-Rescue-Error``).

    The header lets WebSocket clients, whose libraries rarely expose a failed upgrade's
    body, tell ``token_expired`` from ``token_invalid``.
    """
    headers = {ERROR_HEADER: error.code}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return web.json_response({"error": error.code, "detail": detail},
                             status=error.status, headers=headers)


def query_values(request: web.Request, *names: str) -> list[str | None]:
    """The first value of each of ``names`` in the request's query (None where absent).

    The same parse as ``request.query`` (yarl's is ``parse_qsl`` with blank values kept),
    but not cached on the request's URL, which lives as long as the WebSocket: the
    token (hundreds of bytes) would otherwise stay in memory with every connection.
    """
    found: dict[str, str] = {}
    for name, value in parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True):
        if name in names and name not in found:
            found[name] = value
    return [found.get(name) for name in names]


def method_not_allowed(request: web.Request, allowed: Iterable[str]) -> web.Response:
    """The contract's 405 with its ``Allow`` header."""
    response = error_response(ErrorCode.METHOD_NOT_ALLOWED,
                              f"{request.method} is not allowed on {request.path}")
    response.headers["Allow"] = ", ".join(sorted(allowed))
    return response
