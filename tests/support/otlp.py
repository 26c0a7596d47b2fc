"""An OTLP/HTTP collector stand-in for the tracing tests, and reading what it received.

Nothing here imports OpenTelemetry: the collector keeps raw request bodies, and
:func:`any_value` reads a decoded protobuf ``AnyValue`` by duck typing.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

JOIN_TIMEOUT_S = 5.0


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP stand-in on 127.0.0.1:0 that keeps every request it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        super().__init__(("127.0.0.1", 0), CollectorHandler)


class CollectorHandler(http.server.BaseHTTPRequestHandler):
    """Records each POST as (path, content type, body) and answers an empty 200."""

    server: Collector

    def do_POST(self) -> None:
        """Keep the request on the server and answer 200 with an empty protobuf body."""
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet (the default writes every request to stderr)."""


@contextmanager
def serving_collector() -> Iterator[Collector]:
    """A :class:`Collector` serving on a thread for the ``with`` block; shut down after."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(JOIN_TIMEOUT_S)


def any_value(value: Any) -> Any:
    """The Python value of an OTLP ``AnyValue`` (whichever field is set)."""
    return getattr(value, value.WhichOneof("value"))
