"""A node with otel_endpoint exports connection, handshake and token.mint spans over OTLP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.client import join
from tests.support.observe import wait_until
from tests.support.otlp import Collector, any_value, serving_collector
from tests.support.relay import RelayProcess

SERVICE_KEY = "tracing-service-key"
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]+\.")


@pytest.fixture
def collector() -> Iterator[Collector]:
    with serving_collector() as server:
        yield server


def spans(collector: Collector) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for _path, _ct, body in list(collector.requests):
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: any_value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                out += [(resource, s) for s in ss.spans]
    return out


async def test_wired_spans(relay_factory: Any, key_dir: Path, collector: Collector,
                           http: aiohttp.ClientSession) -> None:
    port = collector.server_address[1]
    relay: RelayProcess = relay_factory(
        workers=2, otel_endpoint=f"http://127.0.0.1:{port}", service_keys=SERVICE_KEY,
        signing_keys=str(key_dir), env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    sid = "trace-sess-0123456789"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as h, \
            h.post(relay.http_url("/v1/fallback/token"),
                   json={"session_id": sid, "telemetry_opt_in": True},
                   headers={"Authorization": f"Bearer {SERVICE_KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        token = (await resp.json())["token"]
    host = await join(http, relay, sid, "host", "peer-host-xyz", token=token)
    part = await join(http, relay, sid, "participant", "peer-part-xyz", token=token)
    await host.send_frame(b"hello")
    assert (await part.recv_frame()).payload == b"hello"
    await part.close()
    await host.close()

    async def all_there() -> bool:
        names = [s.name for _r, s in spans(collector)]
        return names.count("connection") == 2 and names.count("handshake") == 2 \
            and names.count("token.mint") == 1

    await wait_until(all_there, "spans at the collector", 10.0)
    for resource, span in spans(collector):
        attrs = {a.key: any_value(a.value) for a in span.attributes}
        print(span.name, resource.get("beach_rescue.worker_slot"), attrs)
        for value in attrs.values():
            assert value not in (sid, token, "peer-host-xyz", "peer-part-xyz")
            assert not (isinstance(value, str) and JWT_LIKE.search(value))
    conns = [dict((a.key, any_value(a.value)) for a in s.attributes)
             for _r, s in spans(collector) if s.name == "connection"]
    assert sorted(c["beach_rescue.role"] for c in conns) == ["host", "participant"]
    assert {c["beach_rescue.close_reason"] for c in conns} == {"NORMAL"}
    assert sum(c["beach_rescue.bytes_in"] for c in conns) == 13
    relay.stop()
    assert not [line for line in relay.lines if "ended span" in line or "opentelemetry" in line]
