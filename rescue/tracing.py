"""Optional OpenTelemetry tracing: spans for connections, handshakes and token minting.

Off by default. With an empty endpoint :func:`setup_tracing` does nothing and nothing
imports OpenTelemetry; :func:`span` then returns one shared no-op object, so a
``with span(...)`` costs a function call and two empty method calls. On, every process
sets tracing up for itself *after* the fork (the exporter's background thread and HTTP
connections do not survive a fork; the supervisor runs no thread before forking), and
spans go to an OTLP/HTTP collector in batches. Needs the ``beach-rescue[otel]`` extra.

Privacy: a span carries only attributes named in :data:`ATTRIBUTES` (closed sets and
numbers: role, close code, byte counts, ...), prefixed ``beach_rescue.``. Any other
attribute (a session id, a peer id, a token) is dropped and logged once by name, never
by value; a string value that looks like a JWT is dropped too. Exceptions mark a span
as failed with the exception's type name only: messages can quote session ids.

The span catalogue is documented in ``docs/tracing.md``.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from rescue import __version__
from rescue.logs import log_event

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

__all__ = [
    "ATTRIBUTES", "NOOP_SPAN", "Span", "SpanScope", "TracingError", "check_tracing",
    "enabled", "setup_tracing", "shutdown_tracing", "span", "traces_url",
]

log = logging.getLogger("rescue.tracing")

AttributeValue = str | bool | int | float

PREFIX = "beach_rescue."
# The only attributes a span may carry: none of them can identify a session or a user.
ATTRIBUTES = frozenset({
    "role",  # host | participant
    "outcome",  # ok, or the close code / error code that refused
    "close_code",  # the WebSocket close code (int)
    "close_reason",  # its name, e.g. NORMAL, SLOW_CONSUMER
    "bytes_in", "bytes_out", "messages_in", "messages_out",
    "worker_slot",
    "http_status",
    "ttl_s", "guardrail", "telemetry",
})
TRACES_PATH = "/v1/traces"
EXPORT_TIMEOUT_S = 5
SHUTDOWN_FLUSH_MS = 2000
# The SDK first: with an exporter passed in (tests), only the SDK is needed.
REQUIRED_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
_JWT = re.compile(r"eyJ[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*")


class TracingError(Exception):
    """Tracing was asked for but cannot run: a bad endpoint or the extra not installed."""


class Span(Protocol):
    """What code inside a ``with span(...)`` block may do with the span."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set one attribute (dropped unless its name is in :data:`ATTRIBUTES`)."""


class SpanScope(Protocol):
    """The context manager :func:`span` returns; entering it gives the :class:`Span`."""

    def __enter__(self) -> Span: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None: ...


class _NoopSpan:
    """The span of disabled tracing: one shared object, every method does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Do nothing."""

    def end(self) -> None:
        """Do nothing."""

    def child(self, name: str, **attrs: AttributeValue) -> _NoopSpan:
        """Itself: children of a disabled span are disabled too."""
        return self


class OpenSpan(Protocol):
    """A span that outlives any one ``with`` block (a connection's): ended explicitly."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set one attribute (dropped unless its name is in :data:`ATTRIBUTES`)."""

    def end(self) -> None:
        """End the span (once)."""

    def child(self, name: str, **attrs: AttributeValue) -> SpanScope:
        """A ``with`` scope for a span whose parent is this one."""


NOOP_SPAN = _NoopSpan()

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_dropped: set[str] = set()


def span(name: str, **attrs: AttributeValue) -> SpanScope:
    """A span named ``name`` with ``attrs`` (see :data:`ATTRIBUTES`) around a ``with`` block.

    With tracing off this is :data:`NOOP_SPAN` itself, every time.
    """
    tracer = _tracer
    if tracer is None:
        return NOOP_SPAN
    return _RecordingSpan(tracer, name, attrs)


def start_span(name: str, **attrs: AttributeValue) -> OpenSpan:
    """Start a span named ``name`` that is not made current; the caller must :meth:`end` it.

    For work that is not one ``with`` block (a connection served by callbacks). With
    tracing off this is :data:`NOOP_SPAN`.
    """
    tracer = _tracer
    if tracer is None:
        return NOOP_SPAN
    return _DetachedSpan(tracer, tracer.start_span(name, attributes=_allowed(attrs),
                                                   record_exception=False,
                                                   set_status_on_exception=False))


def enabled() -> bool:
    """True once :func:`setup_tracing` turned tracing on in this process."""
    return _tracer is not None


class _RecordingSpan:
    """One live OpenTelemetry span, with the attribute filter in front of it."""

    __slots__ = ("_attrs", "_name", "_scope", "_span", "_tracer")

    def __init__(self, tracer: Tracer, name: str, attrs: Mapping[str, AttributeValue],
                 parent: Any = None) -> None:
        self._tracer = tracer
        self._name = name
        self._attrs = attrs
        self._scope: Any = parent  # the parent span until entered
        self._span: Any = None

    def __enter__(self) -> _RecordingSpan:
        context = None
        if self._scope is not None:
            from opentelemetry.trace import set_span_in_context  # noqa: PLC0415

            context = set_span_in_context(self._scope)
        self._scope = self._tracer.start_as_current_span(
            self._name, context=context, attributes=_allowed(self._attrs),
            record_exception=False, set_status_on_exception=False)
        self._span = self._scope.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        if exc_type is not None:
            from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

            self._span.set_status(Status(StatusCode.ERROR, exc_type.__name__))
        result: bool | None = self._scope.__exit__(exc_type, exc, tb)
        return result

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set ``beach_rescue.<key>`` if ``key`` and ``value`` pass the filter."""
        clean = _allowed({key: value})
        if clean:
            self._span.set_attributes(clean)


class _DetachedSpan:
    """A live OpenTelemetry span that is not current anywhere (see :func:`start_span`)."""

    __slots__ = ("_span", "_tracer")

    def __init__(self, tracer: Tracer, span: Any) -> None:
        self._tracer = tracer
        self._span = span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set ``beach_rescue.<key>`` if ``key`` and ``value`` pass the filter."""
        clean = _allowed({key: value})
        if clean:
            self._span.set_attributes(clean)

    def end(self) -> None:
        """End the span."""
        self._span.end()

    def child(self, name: str, **attrs: AttributeValue) -> SpanScope:
        """A ``with`` scope for a child span of this one."""
        return _RecordingSpan(self._tracer, name, attrs, parent=self._span)


def _allowed(attrs: Mapping[str, object]) -> dict[str, AttributeValue]:
    """The attributes that may leave the process, prefixed; the rest are dropped."""
    out: dict[str, AttributeValue] = {}
    for key, value in attrs.items():
        if key not in ATTRIBUTES or not isinstance(value, str | bool | int | float) or (
                isinstance(value, str) and _JWT.search(value)):
            _note_dropped(key)
            continue
        out[PREFIX + key] = value
    return out


def _note_dropped(key: str) -> None:
    """Log a dropped attribute once per name and setup (never its value)."""
    if key not in _dropped:
        _dropped.add(key)
        log_event(log, "tracing.attribute_dropped", level=logging.WARNING, attribute=key)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for ``endpoint``: a bare ``http(s)://host:port`` gets
    ``/v1/traces`` appended, a URL with a path is used as it is.

    Raises :class:`TracingError` for anything but an http or https URL with a host.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingError(f"the OTLP endpoint must be an http:// or https:// URL with a "
                           f"host, e.g. http://127.0.0.1:4318, not {endpoint!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=TRACES_PATH)
    return urlunsplit(parts)


def check_tracing(endpoint: str) -> None:
    """Check, without setting anything up, that tracing to ``endpoint`` can start.

    Does nothing for an empty endpoint (tracing off). Otherwise imports the OpenTelemetry
    modules (which start no thread) and raises :class:`TracingError` for a bad URL or when
    the ``otel`` extra is missing or broken. Meant for the supervisor before it forks: a
    bad setting stops the node at start instead of failing every worker, and the workers
    share the imported modules' memory.
    """
    if not endpoint:
        return
    traces_url(endpoint)
    _require(REQUIRED_MODULES)


def _require(modules: tuple[str, ...]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TracingError(f"tracing needs {module} ({e}): install "
                               "beach-rescue[otel]") from None


def setup_tracing(config_endpoint: str, service_name: str, *, sample_ratio: float = 1.0,
                  resource_attributes: Mapping[str, AttributeValue] | None = None,
                  exporter: SpanExporter | None = None) -> None:
    """Turn tracing on in this process, exporting to ``config_endpoint`` (OTLP/HTTP).

    An empty endpoint leaves tracing off and imports nothing. Call after fork, once per
    process; a second call replaces the first setup. ``sample_ratio`` is the share of
    traces kept (0 to 1). ``exporter`` replaces the OTLP exporter and exports each span
    as it ends (for tests). Raises :class:`TracingError` (see :func:`check_tracing`) and
    ``ValueError`` for a ratio outside 0..1.
    """
    global _tracer, _provider  # noqa: PLW0603 - one tracer per process, set after fork
    if not config_endpoint:
        return
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be between 0 and 1, not {sample_ratio}")
    url = traces_url(config_endpoint)
    _require(REQUIRED_MODULES if exporter is None else REQUIRED_MODULES[:1])
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SimpleSpanProcessor,
    )
    from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
        ParentBased,
        TraceIdRatioBased,
    )

    shutdown_tracing()
    _dropped.clear()
    resource = Resource.create({"service.name": service_name,
                                "service.version": __version__,
                                **(resource_attributes or {})})
    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)))
    _provider = provider
    _tracer = provider.get_tracer("beach-rescue", __version__)
    where = urlsplit(url)  # logged without user info or query (they may hold a secret)
    port = f":{where.port}" if where.port else ""
    log_event(log, "tracing.enabled", sample_ratio=sample_ratio,
              endpoint=f"{where.scheme}://{where.hostname}{port}{where.path}")


def shutdown_tracing() -> None:
    """Export the spans still buffered (bounded wait) and turn tracing off again.

    Call before a process that set tracing up exits (workers leave with ``os._exit``, so
    nothing would flush them otherwise). Does nothing when tracing is off.
    """
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.force_flush(SHUTDOWN_FLUSH_MS)
        provider.shutdown()
