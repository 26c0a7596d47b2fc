"""Structured logging: one redacted JSON object per line on stderr.

Every record becomes a line like::

    {"ts":"2025-01-02T03:04:05.678Z","level":"info","logger":"rescue.server",
     "event":"connection.closed","pid":4242,"code":4004,"peer_id":"a1"}

The message is, by convention, a dotted event name; structured data goes in
``extra={"fields": {...}}`` (or the keyword arguments of :func:`log_event`) and is merged
into the object. Before encoding, every line passes through :func:`redact`, so tokens,
keys and secrets do not reach the log even when they hide in a URL, a header value, a
nested field or an exception message. Formatting never raises: values JSON cannot carry
are logged as their ``repr`` (redacted too).

Nothing here runs per frame: the relay logs connection-level events only.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import msgspec

__all__ = ["REDACTED", "JsonFormatter", "configure_logging", "log_event", "redact"]

REDACTED = "[redacted]"
_REDACTED_JWT = "[redacted-jwt]"
_REDACTED_PEM = "[redacted-pem]"
_TOO_DEEP = "[too-deep]"
_MAX_DEPTH = 32

_SECRET_KEYS = frozenset({
    "token", "authorization", "secret", "password", "key", "admin_key", "service_key",
    "private_key", "entitlement_proof",
})
_SECRET_SUFFIXES = ("_token", "_key", "_secret")

# Order matters: a PEM block spans whitespace, so it goes first; "Bearer <jwt>" must read
# "Bearer [redacted]", so Bearer goes before the JWT pattern; query strings go last.
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
    r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)",  # unterminated: redact to the end
    re.DOTALL)
_BEARER = re.compile(r"\b(bearer)\s+\S+", re.IGNORECASE)
_JWT = re.compile(r"eyJ[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*")
_QUERY = re.compile(r"\?\S+")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}

# Keys of the line itself; a field with one of these names is written as "fields.<name>".
_RESERVED = frozenset({"ts", "level", "logger", "event", "pid", "exc", "stack"})


def _is_secret_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES)


def _redact_str(text: str) -> str:
    if "-----BEGIN" in text:
        text = _PEM.sub(_REDACTED_PEM, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if "eyJ" in text:
        text = _JWT.sub(_REDACTED_JWT, text)
    if "?" in text:
        text = _QUERY.sub("?" + REDACTED, text)
    return text


def _redact(value: object, depth: int) -> object:
    if isinstance(value, str):
        return _redact_str(value)
    if depth >= _MAX_DEPTH and isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return _TOO_DEEP
    if isinstance(value, Mapping):
        out: dict[object, object] = {}
        for k, v in value.items():
            if isinstance(k, str):
                out[_redact_str(k)] = REDACTED if _is_secret_key(k) else _redact(v, depth + 1)
            else:
                out[k] = _redact(v, depth + 1)
        return out
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v, depth + 1) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(_redact(v, depth + 1) for v in value)
    return value


def redact(value: object) -> object:
    """Return a copy of ``value`` with secrets replaced; ``value`` itself is not modified.

    Mappings, lists, tuples and sets are walked recursively (mappings come back as
    dicts). A value under a secret-looking key (``token``, ``authorization``, ``secret``,
    ``password``, ``key``, ``admin_key``, ``service_key``, ``private_key``,
    ``entitlement_proof``, or any key ending in ``_token``/``_key``/``_secret``; case and
    ``-``/``_`` ignored) becomes ``"[redacted]"``. In every string, PEM private key blocks
    become ``[redacted-pem]``, ``Bearer <credential>`` becomes ``Bearer [redacted]``,
    JWT-shaped text becomes ``[redacted-jwt]`` and a query string (``?`` up to whitespace)
    becomes ``?[redacted]``. Other values are returned unchanged. Containers nested
    deeper than 32 levels are replaced by ``"[too-deep]"``.
    """
    return _redact(value, 0)


def _jsonable(value: object, depth: int = 0, text: Callable[[str], str] = str) -> object:
    """Convert ``value`` to exact JSON-native types, using ``repr`` for anything else.

    ``text`` is applied to every string (used to escape lone surrogates, which UTF-8
    cannot carry).
    """
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float:
        return value
    if kind is str:
        return text(value)  # type: ignore[arg-type]
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, depth, text)
    if isinstance(value, str):
        return text(str.__str__(value))
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if depth >= _MAX_DEPTH:
        return _TOO_DEEP
    if isinstance(value, Mapping):
        return {text(str.__str__(k) if isinstance(k, str) else repr(k)):
                _jsonable(v, depth + 1, text) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1, text) for v in value]
    try:
        return text(repr(value))
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _escape_surrogates(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """Format a record as one redacted JSON object (no trailing newline); never raises.

    Keys: ``ts`` (RFC 3339 UTC, milliseconds), ``level`` (lower case), ``logger``,
    ``event`` (the formatted message), ``pid``, every key of the record's ``fields``
    mapping (a name clashing with these becomes ``fields.<name>``), ``exc`` (the
    traceback) when ``exc_info`` is set and ``stack`` when ``stack_info`` is.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line for ``record``."""
        try:
            return self._format(record)
        except Exception as e:  # a log line must never take the caller down
            try:
                fallback = {"ts": _timestamp(time.time()), "level": "error",
                            "logger": "rescue.logs", "event": "log.format_failed",
                            "pid": os.getpid(), "error": _redact_str(repr(e)),
                            "original_logger": str(getattr(record, "name", "?"))}
                return msgspec.json.encode(fallback).decode()
            except Exception:
                return '{"event":"log.format_failed"}'

    def _format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: keep what was given
            message = f"{record.msg!r} % {record.args!r}"
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": message,
            "pid": record.process if record.process is not None else os.getpid(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = key if isinstance(key, str) else repr(key)
                line[f"fields.{name}" if name in _RESERVED else name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        clean = redact(_jsonable(line))
        try:
            return msgspec.json.encode(clean).decode()
        except UnicodeEncodeError:  # a lone surrogate somewhere
            return msgspec.json.encode(_jsonable(clean, text=_escape_surrogates)).decode()


class _JsonLinesHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (recognised so it is installed once)."""


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as JSON lines.

    Installs one handler with :class:`JsonFormatter` on the root logger and sets the root
    level. Idempotent: a handler installed by an earlier call is replaced, never added
    twice; handlers installed by others are left alone. Raises ValueError for an unknown
    level name (debug, info, warning, error, critical; any case).
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    handler = _JsonLinesHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO,
              **fields: object) -> None:
    """Log ``event`` with ``fields`` at ``level``; does nothing (cheaply) if it is disabled."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, stacklevel=2)
