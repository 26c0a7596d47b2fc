"""Optional tracing: a shared no-op when off (nothing imported), filtered spans when on,
and a real OTLP/HTTP export to a collector stand-in."""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rescue import tracing
from rescue.keys import SigningKey
from rescue.tokens import mint_token
from rescue.tracing import ATTRIBUTES, NOOP_SPAN, PREFIX, TracingError, span
from tests.support.otlp import Collector, any_value, serving_collector

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = "http://127.0.0.1:4318"
SERVICE = "beach-rescue-test"
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]+\.")
session_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True)


@pytest.fixture(autouse=True)
def tracing_off_afterwards() -> Iterator[None]:
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Tracing on, every finished span kept in memory."""
    memory = InMemorySpanExporter()
    tracing.setup_tracing(ENDPOINT, SERVICE, exporter=memory)
    return memory


def attributes(exporter: InMemorySpanExporter) -> dict[str, dict[str, Any]]:
    return {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}


# --- off ---------------------------------------------------------------------------------


def test_off_every_span_is_the_one_shared_noop() -> None:
    assert not tracing.enabled()
    tracing.setup_tracing("", SERVICE)  # an empty endpoint means off
    assert not tracing.enabled()
    first, second = span("connection", role="host"), span("token.mint")
    assert first is second is NOOP_SPAN
    with span("handshake") as inside:
        inside.set_attribute("close_code", 1000)
    assert inside is NOOP_SPAN
    with pytest.raises(ValueError, match="passes through"), span("connection"):
        raise ValueError("passes through")


def test_off_nothing_imports_opentelemetry() -> None:
    script = textwrap.dedent("""
        import sys
        import rescue.tracing as t

        def loaded():
            return sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")

        t.check_tracing("")
        t.setup_tracing("", "svc")
        with t.span("connection", role="host") as s:
            s.set_attribute("bytes_in", 1)
        print(loaded())
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter)
        t.setup_tracing("http://127.0.0.1:9", "svc", exporter=InMemorySpanExporter())
        print(bool(loaded()) and t.enabled())  # the check above sees imports
        t.shutdown_tracing()
    """)
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True"], result.stdout


# --- on ----------------------------------------------------------------------------------


def test_spans_have_their_names_parents_and_attributes(exporter: InMemorySpanExporter) -> None:
    assert tracing.enabled()
    with span("connection", worker_slot=1) as conn:
        with span("handshake", role="participant") as hello:
            hello.set_attribute("outcome", "ok")
        for key, value in (("role", "participant"), ("close_code", 1000),
                           ("close_reason", "NORMAL"), ("bytes_in", 123), ("bytes_out", 45),
                           ("messages_in", 3), ("messages_out", 2)):
            conn.set_attribute(key, value)
    with span("token.mint", ttl_s=300, guardrail="ok", telemetry=False) as mint:
        mint.set_attribute("http_status", 200)

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["handshake", "connection", "token.mint"]
    hello_span, conn_span, mint_span = spans
    assert hello_span.parent is not None
    assert hello_span.parent.span_id == conn_span.context.span_id
    assert conn_span.parent is None and mint_span.parent is None
    assert attributes(exporter) == {
        "handshake": {PREFIX + "role": "participant", PREFIX + "outcome": "ok"},
        "connection": {PREFIX + "worker_slot": 1, PREFIX + "role": "participant",
                       PREFIX + "close_code": 1000, PREFIX + "close_reason": "NORMAL",
                       PREFIX + "bytes_in": 123, PREFIX + "bytes_out": 45,
                       PREFIX + "messages_in": 3, PREFIX + "messages_out": 2},
        "token.mint": {PREFIX + "ttl_s": 300, PREFIX + "guardrail": "ok",
                       PREFIX + "telemetry": False, PREFIX + "http_status": 200},
    }
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert conn_span.resource.attributes["service.name"] == SERVICE


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50,
          deadline=None)
@given(sid=session_ids, peer_id=st.text(min_size=1, max_size=40))
def test_no_attribute_carries_an_identity_or_a_token(
        exporter: InMemorySpanExporter, signing_key: SigningKey, sid: str,
        peer_id: str) -> None:
    assume({sid, peer_id}.isdisjoint({"host", "ok", "NORMAL"}))
    exporter.clear()
    token = mint_token(signing_key, session_id=sid, now=time.time())
    with span("connection", session_id=sid, peer_id=peer_id, token=token,
              role="host", outcome=f"refused {token}") as conn:
        conn.set_attribute("session", sid)
        conn.set_attribute("close_reason", token)
        conn.set_attribute("cohort", peer_id)
        conn.set_attribute("close_code", 1000)
    with span("token.mint", outcome="ok") as mint:
        mint.set_attribute("guardrail", f"Bearer {token}")

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["connection", "token.mint"]
    for recorded in spans:
        for key, value in (recorded.attributes or {}).items():
            assert key.startswith(PREFIX) and key[len(PREFIX):] in ATTRIBUTES, key
            assert value not in (sid, peer_id, token), (key, value)
            assert not (isinstance(value, str) and JWT_LIKE.search(value)), (key, value)
    # The harmless attributes passed alongside survive.
    assert attributes(exporter) == {
        "connection": {PREFIX + "role": "host", PREFIX + "close_code": 1000},
        "token.mint": {PREFIX + "outcome": "ok"},
    }


def test_dropped_attributes_are_logged_by_name_only(exporter: InMemorySpanExporter,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    secret_sid = "sess-logged-never-0001"
    with caplog.at_level(logging.WARNING, "rescue.tracing"), \
            span("connection", session_id=secret_sid):
        pass
    dropped = [r for r in caplog.records if r.getMessage() == "tracing.attribute_dropped"]
    assert [r.fields for r in dropped] == [{"attribute": "session_id"}]  # type: ignore[attr-defined]
    assert secret_sid not in caplog.text
    assert attributes(exporter) == {"connection": {}}


def test_the_endpoint_is_logged_without_credentials(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "rescue.tracing"):
        tracing.setup_tracing("https://relay:hunter2@otel.example.com/t/v1/traces?key=s3cret",
                              SERVICE, exporter=InMemorySpanExporter())
    [enabled] = [r for r in caplog.records if r.getMessage() == "tracing.enabled"]
    assert enabled.fields == {  # type: ignore[attr-defined]
        "endpoint": "https://otel.example.com/t/v1/traces", "sample_ratio": 1.0}
    assert "hunter2" not in caplog.text and "s3cret" not in caplog.text


def test_an_exception_fails_the_span_without_its_message(
        exporter: InMemorySpanExporter) -> None:
    sid = "sess-in-an-error-message"
    with pytest.raises(ValueError, match=sid), span("token.mint"):
        raise ValueError(f"invalid session id {sid!r}")
    [failed] = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError"
    assert not failed.events  # no exception event with the message and stack


def test_sample_ratio_zero_keeps_no_trace() -> None:
    memory = InMemorySpanExporter()
    tracing.setup_tracing(ENDPOINT, SERVICE, exporter=memory, sample_ratio=0.0)
    with span("connection") as conn:
        conn.set_attribute("close_code", 1000)
    assert tracing.enabled() and memory.get_finished_spans() == ()
    with pytest.raises(ValueError, match="sample_ratio"):
        tracing.setup_tracing(ENDPOINT, SERVICE, exporter=memory, sample_ratio=1.5)


def test_shutdown_turns_tracing_off_again(exporter: InMemorySpanExporter) -> None:
    assert span("connection") is not NOOP_SPAN
    tracing.shutdown_tracing()
    assert not tracing.enabled() and span("connection") is NOOP_SPAN
    with span("connection"):
        pass
    assert exporter.get_finished_spans() == ()


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "url"), [
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("https://otel.example.com", "https://otel.example.com/v1/traces"),
    ("https://otel.example.com/tenant-a/v1/traces", "https://otel.example.com/tenant-a/v1/traces"),
])
def test_traces_url_appends_the_signal_path_to_a_bare_endpoint(endpoint: str,
                                                               url: str) -> None:
    assert tracing.traces_url(endpoint) == url


@pytest.mark.parametrize("endpoint", ["collector:4318", "127.0.0.1:4318", "grpc://c:4317",
                                      "http://", "file:///tmp/spans"])
def test_bad_endpoints_are_refused_before_anything_starts(endpoint: str) -> None:
    with pytest.raises(TracingError, match="http"):
        tracing.check_tracing(endpoint)
    with pytest.raises(TracingError):
        tracing.setup_tracing(endpoint, SERVICE)
    assert not tracing.enabled()


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr("importlib.import_module", no_module)
    with pytest.raises(TracingError, match=re.escape("beach-rescue[otel]")):
        tracing.check_tracing(ENDPOINT)
    with pytest.raises(TracingError, match=re.escape("beach-rescue[otel]")):
        tracing.setup_tracing(ENDPOINT, SERVICE)
    assert not tracing.enabled()
    tracing.check_tracing("")  # off never needs it


def test_an_injected_exporter_needs_only_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def without_otlp(name: str) -> Any:
        if name.startswith("opentelemetry.exporter"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name)

    monkeypatch.setattr("importlib.import_module", without_otlp)
    with pytest.raises(TracingError, match=re.escape("opentelemetry.exporter")):
        tracing.setup_tracing(ENDPOINT, SERVICE)
    memory = InMemorySpanExporter()
    tracing.setup_tracing(ENDPOINT, SERVICE, exporter=memory)
    with span("handshake"):
        pass
    assert [s.name for s in memory.get_finished_spans()] == ["handshake"]


# --- a real export -------------------------------------------------------------------------


@pytest.fixture
def collector() -> Iterator[Collector]:
    with serving_collector() as server:
        yield server


def test_spans_reach_an_otlp_collector_on_shutdown(collector: Collector) -> None:
    # The exporter comes with the `otel` extra (the `dev` extra has the SDK only).
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    port = collector.server_address[1]
    tracing.setup_tracing(f"http://127.0.0.1:{port}", SERVICE,
                          resource_attributes={PREFIX + "worker_slot": 3})
    with span("connection", role="host") as conn:
        conn.set_attribute("close_code", 1000)
    tracing.shutdown_tracing()  # flushes the batch

    [(path, content_type, body)] = collector.requests
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
    assert resource["service.name"] == SERVICE
    assert resource[PREFIX + "worker_slot"] == 3
    [scope_spans] = resource_spans.scope_spans
    [exported] = scope_spans.spans
    assert exported.name == "connection"
    assert {a.key: any_value(a.value) for a in exported.attributes} == {
        PREFIX + "role": "host", PREFIX + "close_code": 1000}
