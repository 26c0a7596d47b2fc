"""Tests for rescue.logs: JSON lines, redaction, idempotent setup, cheap disabled logging."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from rescue.codes import CloseCode
from rescue.logs import REDACTED, JsonFormatter, configure_logging, log_event, redact

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def real_jwt() -> str:
    key = Ed25519PrivateKey.generate()
    now = int(time.time())
    return jwt.encode({"sid": "s-1", "iat": now, "nbf": now, "exp": now + 300,
                       "aud": "beach-rescue", "iss": "cp", "cohort": "public",
                       "cap": ["fallback-ws"]},
                      key, algorithm="EdDSA", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def pem_private_key() -> str:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


def capture(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def make_record(msg: str, *args: object, **attrs: object) -> logging.LogRecord:
    record = logging.LogRecord("rescue.test", logging.WARNING, __file__, 1, msg, args, None)
    for name, value in attrs.items():
        setattr(record, name, value)
    return record


# --- redact() --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "token", "authorization", "secret", "password", "key", "admin_key", "service_key",
    "private_key", "entitlement_proof", "Authorization", "TOKEN", "Service_Key",
    "refresh_token", "api_key", "client_secret", "X-Api-Key", "access-token"])
def test_secret_keys_are_redacted(key: str) -> None:
    assert redact({key: "s3cr3t-value", "other": 1}) == {key: REDACTED, "other": 1}


@pytest.mark.parametrize("key", ["token_keys", "tokens", "kid", "keyboard", "monkey",
                                 "session_id", "peer_id", "passwords_checked"])
def test_ordinary_keys_are_kept(key: str) -> None:
    assert redact({key: "visible"}) == {key: "visible"}


def test_secret_key_redacts_any_value_type() -> None:
    value = {"token": {"nested": "x"}, "password": 1234, "secret": ["a", "b"], "key": None}
    assert redact(value) == {"token": REDACTED, "password": REDACTED, "secret": REDACTED,
                             "key": REDACTED}


def test_redaction_is_recursive_through_dicts_lists_tuples_and_sets(real_jwt: str) -> None:
    value = {"a": [{"b": ({"service_key": "k"}, f"Bearer {real_jwt}")}],
             "s": {f"/ws?token={real_jwt}"}}
    assert redact(value) == {"a": [{"b": ({"service_key": REDACTED}, f"Bearer {REDACTED}")}],
                             "s": {"/ws?[redacted]"}}


def test_redact_does_not_modify_its_input() -> None:
    value = {"token": "t", "list": ["/x?y=1"]}
    redact(value)
    assert value == {"token": "t", "list": ["/x?y=1"]}


@pytest.mark.parametrize(("text", "expected"), [
    ("GET /ws?session=abc&token=xyz HTTP/1.1", "GET /ws?[redacted] HTTP/1.1"),
    ("https://relay.example/ws?token=abc", "https://relay.example/ws?[redacted]"),
    ("two /a?x=1 and /b?y=2", "two /a?[redacted] and /b?[redacted]"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [redacted]"),
    ("authorization: bearer opaque123", "authorization: bearer [redacted]"),
    ("connection.closed", "connection.closed"),
    ("is it over?", "is it over?"),
    ("a ? b", "a ? b"),
    ("", ""),
])
def test_string_patterns(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_jwt_is_redacted_anywhere_in_a_string(real_jwt: str) -> None:
    assert redact(f"token {real_jwt} rejected") == "token [redacted-jwt] rejected"
    assert redact(f"sig:{real_jwt}") == "sig:[redacted-jwt]"
    unsecured = "eyJhbGciOiJub25lIn0.eyJzaWQiOiJ4In0."
    assert redact(f"alg none {unsecured}") == "alg none [redacted-jwt]"


def test_bearer_jwt_reads_bearer_redacted(real_jwt: str) -> None:
    assert redact(f"Bearer {real_jwt}") == "Bearer [redacted]"


def test_pem_private_key_blocks_are_redacted(pem_private_key: str) -> None:
    text = f"loaded key:\n{pem_private_key}done"
    assert redact(text) == "loaded key:\n[redacted-pem]\ndone"
    rsa = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----"
    assert redact(rsa) == "[redacted-pem]"
    truncated = "x -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXkt"
    assert redact(truncated) == "x [redacted-pem]"


def test_public_keys_are_not_redacted() -> None:
    public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----"
    assert redact(public) == public


def test_other_values_pass_through_unchanged() -> None:
    marker = object()
    assert redact(marker) is marker
    assert redact(42) == 42
    assert redact(b"/ws?token=x") == b"/ws?token=x"  # bytes are not text; logs repr() them


def test_very_deep_nesting_is_cut_off() -> None:
    value: list[object] = ["/ws?token=deep"]
    for _ in range(100):
        value = [value]
    out = redact(value)
    assert "token=deep" not in json.dumps(out)
    assert "[too-deep]" in json.dumps(out)


b64url = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                 min_size=8, max_size=60)
surrounding = st.text(max_size=40)


@given(before=surrounding, after=surrounding, header=b64url, claims=b64url, sig=b64url)
def test_jwt_shaped_tokens_never_survive(before: str, after: str, header: str, claims: str,
                                         sig: str) -> None:
    token = f"eyJ{header}.{claims}.{sig}"
    out = redact({"detail": before + token + after, "url": f"/ws?token={token}"})
    assert token not in json.dumps(out)


@given(st.recursive(st.none() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20))
def test_redact_is_idempotent(value: object) -> None:
    once = redact(value)
    assert redact(once) == once


# --- JsonFormatter ---------------------------------------------------------------------------

def test_line_has_the_documented_keys() -> None:
    record = make_record("connection.closed", created=1_700_000_000.25,
                         fields={"code": CloseCode.REPLACED, "peer_id": "p1"})
    record.msecs = 250.0
    line = json.loads(JsonFormatter().format(record))
    assert line == {"ts": "2023-11-14T22:13:20.250Z", "level": "warning",
                    "logger": "rescue.test", "event": "connection.closed",
                    "pid": os.getpid(), "code": 4004, "peer_id": "p1"}


def test_fields_cannot_overwrite_line_keys() -> None:
    record = make_record("real.event", fields={"event": "fake", "level": "debug", "x": 1})
    line = json.loads(JsonFormatter().format(record))
    assert (line["event"], line["level"]) == ("real.event", "warning")
    assert (line["fields.event"], line["fields.level"], line["x"]) == ("fake", "debug", 1)


def test_unencodable_values_become_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing /ws?token=leak>"

    record = make_record("e", fields={"thing": Thing(), "raw": b"\x00\xff", "set": {3},
                                      "pair": (1, "a"), 5: "int key"})
    line = json.loads(JsonFormatter().format(record))
    assert line["thing"] == "<Thing /ws?[redacted]"
    assert line["raw"] == repr(b"\x00\xff")
    assert line["set"] == [3]
    assert line["pair"] == [1, "a"]
    assert line["5"] == "int key"


def test_formatter_never_raises() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    cyclic: list[object] = []
    cyclic.append(cyclic)
    formatter = JsonFormatter()
    for record in [make_record("e", fields={"h": Hostile()}),
                   make_record("e", fields={"cycle": cyclic}),
                   make_record("e", fields={"lone": "\ud800 surrogate"}),
                   make_record("bad %d args", "not-a-number"),
                   make_record("e", fields={"x": float("nan")})]:
        out = formatter.format(record)
        assert "\n" not in out
        assert json.loads(out)["logger"] == "rescue.test"


def test_bad_percent_args_keep_the_message_and_args() -> None:
    line = json.loads(JsonFormatter().format(make_record("bad %d", "x")))
    assert "bad %d" in line["event"]
    assert "'x'" in line["event"]


# --- through a real logger -------------------------------------------------------------------

def test_secrets_never_reach_the_output(real_jwt: str, pem_private_key: str) -> None:
    opaque = secrets.token_urlsafe(24)
    service_key = secrets.token_hex(16)
    stream = capture("debug")
    log = logging.getLogger("rescue.test.secrets")
    log.info(f"hello with {real_jwt}")
    log.info("args carry %s", real_jwt)
    log.info("ws.upgrade", extra={"fields": {
        "token": opaque, "admin_key": service_key,
        "url": f"/ws?session=s-1&token={opaque}",
        "headers": {"Authorization": f"Bearer {opaque}", "Host": "relay"},
        "nested": [{"detail": f"token was {real_jwt}"}],
        "key_file": pem_private_key}})
    try:
        raise ValueError(f"token rejected: {real_jwt} via /ws?token={opaque}")
    except ValueError:
        log.exception("token.rejected")
    log_event(log, "control.request", authorization=f"Bearer {service_key}",
              path=f"/v1/fallback/token?key={service_key}")

    output = stream.getvalue()
    records = lines(stream)
    assert len(records) == 5
    for secret in (real_jwt, opaque, service_key, "PRIVATE KEY", "MC4CAQAw"):
        assert secret not in output
    # Each secret left a placeholder behind, so the lines still say what happened.
    assert records[0]["event"] == "hello with [redacted-jwt]"
    assert records[1]["event"] == "args carry [redacted-jwt]"
    assert records[2]["token"] == REDACTED
    assert records[2]["url"] == "/ws?[redacted]"
    assert records[2]["headers"] == {"Authorization": REDACTED, "Host": "relay"}
    assert records[2]["key_file"] == "[redacted-pem]\n"
    assert "ValueError: token rejected: [redacted-jwt] via /ws?[redacted]" in records[3]["exc"]
    assert records[4]["path"] == "/v1/fallback/token?[redacted]"


def test_exception_traceback_is_included() -> None:
    stream = capture()
    lookup: dict[str, int] = {}
    try:
        lookup["missing"]
    except KeyError:
        logging.getLogger("rescue.test.exc").exception("lookup.failed")
    (record,) = lines(stream)
    assert record["event"] == "lookup.failed"
    assert record["level"] == "error"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in record["exc"]
    assert TS_RE.match(record["ts"])


def test_one_object_per_line() -> None:
    stream = capture()
    log = logging.getLogger("rescue.test.lines")
    log.info("a.b", extra={"fields": {"text": "multi\nline\ntext"}})
    log.warning("c.d")
    raw = stream.getvalue()
    assert raw.count("\n") == 2
    assert [r["event"] for r in lines(stream)] == ["a.b", "c.d"]
    assert lines(stream)[0]["text"] == "multi\nline\ntext"


# --- configure_logging -----------------------------------------------------------------------

def json_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]


def test_configure_logging_is_idempotent() -> None:
    first = capture()
    second = capture()
    assert len(json_handlers()) == 1
    logging.getLogger("rescue.test.idem").info("once")
    assert first.getvalue() == ""
    assert [r["event"] for r in lines(second)] == ["once"]


def test_configure_logging_keeps_other_handlers() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    capture()
    capture()
    assert other in logging.getLogger().handlers


def test_configure_logging_sets_the_level() -> None:
    stream = capture("WARNING")
    log = logging.getLogger("rescue.test.level")
    log.info("dropped")
    log.warning("kept")
    assert [r["event"] for r in lines(stream)] == ["kept"]
    assert logging.getLogger().level == logging.WARNING


def test_configure_logging_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    logging.getLogger("rescue.test.stderr").info("to.stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err.splitlines()[-1])["event"] == "to.stderr"


def test_configure_logging_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose")


# --- log_event -------------------------------------------------------------------------------

def test_log_event_merges_fields_and_points_at_the_caller() -> None:
    stream = capture()
    log_event(logging.getLogger("rescue.test.event"), "connection.closed",
              logging.WARNING, code=4005, peer_id="p9")
    (record,) = lines(stream)
    assert record["event"] == "connection.closed"
    assert record["level"] == "warning"
    assert (record["code"], record["peer_id"]) == (4005, "p9")


def test_log_event_records_the_callers_location() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("rescue.test.where")
    log.setLevel(logging.INFO)
    handler = Keep()
    log.addHandler(handler)
    try:
        log_event(log, "here")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert [r.funcName for r in seen] == ["test_log_event_records_the_callers_location"]


def test_log_event_does_no_work_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("rescue.test.disabled")
    log.setLevel(logging.WARNING)
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(log, "log", lambda *a, **k: calls.append((a, k)))
    try:
        log_event(log, "debug.only", logging.DEBUG, x=1)
        log_event(log, "info.only", x=1)
        assert calls == []
        log_event(log, "warn", logging.WARNING, x=1)
        assert calls == [((logging.WARNING, "warn"), {"extra": {"fields": {"x": 1}},
                                                      "stacklevel": 2})]
    finally:
        log.setLevel(logging.NOTSET)
