"""Tests for ``beach-rescue probe`` (rescue/probe.py): against real relays, a fake relay
that misbehaves on purpose, usage errors and the pure helpers (hello checks, token and URL
handling). The report functions alone are tested in test_probe_report.py, the probe's
systemd units in tests/deploy/test_systemd_unit.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from rescue import probe
from rescue.cli import main
from rescue.frames import Kind
from rescue.hello import (
    ServerHello,
    encode_peer_joined,
    encode_server_hello,
    new_server_nonce,
    parse_server_message,
)
from rescue.keys import SigningKey, generate_keypair, load_signing_key
from rescue.tokens import mint_token
from tests.support.client import join
from tests.support.relay import RelayProcess, start_relay

SERVICE_KEY = "probe-test-service-key-7d1c"
JSON_KEYS = {"ok", "step", "reason", "exit_code", "target", "session_id", "started_at",
             "duration_s", "frames", "rtt_s", "one_way_s", "connection_ids"}
STATS_KEYS = {"count", "min", "avg", "p50", "p90", "p99", "max"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["probe", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def run_async(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a thread (it runs its own event loop) while this loop serves."""
    code = await asyncio.to_thread(main, ["probe", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse Prometheus text into {family name: [(labels, value)]}; names must be unique."""
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), f"duplicate metric families: {types}"
    return {family.name: [(s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def cp_relay(key_dir: Path, signing_key: SigningKey,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A relay whose embedded control plane signs with the test key and knows SERVICE_KEY."""
    proc = start_relay(key_dir, signing_key, tmp_path_factory.mktemp("cp-state"),
                       service_keys=f"{SERVICE_KEY},another-key", signing_keys=str(key_dir))
    yield proc
    proc.stop()


@pytest.fixture
def service_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "service-key"
    path.write_text(SERVICE_KEY + "\n")
    return path


# --- against a real relay -----------------------------------------------------------------


def test_probe_succeeds_with_a_locally_minted_token_and_reports_json(
        relay: RelayProcess, key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--url", ws_url(relay.port), "--keys", str(key_dir),
                         "--frames", "5", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert set(doc) == JSON_KEYS
    assert (doc["ok"], doc["step"], doc["reason"], doc["exit_code"]) == (True, None, None, 0)
    assert doc["target"] == ws_url(relay.port)
    assert doc["session_id"].startswith("probe-")
    assert doc["frames"] == {"sent": 10, "received": 10}
    assert set(doc["rtt_s"]) == STATS_KEYS and doc["rtt_s"]["count"] == 10
    for direction in ("host_to_participant", "participant_to_host"):
        stats = doc["one_way_s"][direction]
        assert stats["count"] == 5
        assert 0 < stats["min"] <= stats["p50"] <= stats["max"] < doc["duration_s"]
    ids = doc["connection_ids"]
    assert ids["host"] and ids["participant"] and ids["host"] != ids["participant"]
    assert abs(doc["started_at"] - time.time()) < 60


def test_probe_writes_an_atomic_metrics_file_on_success(
        relay: RelayProcess, key_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "textfile" / "beach_rescue_probe.prom"
    path.parent.mkdir()
    code, out, _ = run(capsys, "--url", ws_url(relay.port), "--keys", str(key_dir),
                       "--frames", "3", "--metrics-file", str(path))
    assert code == 0
    assert out.startswith(f"probe ok: {ws_url(relay.port)} session probe-")
    assert os.listdir(path.parent) == [path.name]  # the temporary file was renamed
    found = metrics(path.read_text())
    target = {"target": ws_url(relay.port)}
    assert found["beach_rescue_probe_success"] == [(target, 1.0)]
    assert found["beach_rescue_probe_exit_code"] == [(target, 0.0)]
    assert "beach_rescue_probe_failure_step" not in found
    rtt = {labels["quantile"]: value for labels, value in found["beach_rescue_probe_rtt_seconds"]}
    assert list(rtt) == ["0", "0.5", "0.9", "0.99", "1"]
    assert 0 < rtt["0"] <= rtt["0.5"] <= rtt["1"]
    directions = {labels["direction"] for labels, _ in found["beach_rescue_probe_one_way_seconds"]}
    assert directions == {"host_to_participant", "participant_to_host"}
    (_, finished), = found["beach_rescue_probe_last_run_timestamp_seconds"]
    assert abs(finished - time.time()) < 60


def test_probe_gets_its_token_and_relay_url_from_the_control_plane(
        cp_relay: RelayProcess, service_key_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--control-plane", cp_relay.http_url(""),
                         "--service-key-file", str(service_key_file), "--frames", "2")
    assert (code, err) == (0, "")
    assert out.startswith(f"probe ok: {ws_url(cp_relay.port)} session probe-")
    assert "frames: 4 sent, 4 received" in out
    assert SERVICE_KEY not in out


def test_a_wrong_service_key_exits_3_without_printing_it(
        cp_relay: RelayProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--control-plane", cp_relay.http_url(""),
                         "--service-key", "not-a-service-key", "--json")
    assert code == 3
    assert err == "probe failed at token: 401 unauthenticated\n"
    doc = json.loads(out)
    assert (doc["ok"], doc["step"], doc["exit_code"]) == (False, "token", 3)
    assert doc["rtt_s"] is None and doc["frames"] == {"sent": 0, "received": 0}
    assert "not-a-service-key" not in out + err


def test_a_forged_token_exits_4_naming_401_token_invalid(
        relay: RelayProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kid = generate_keypair(tmp_path / "forger")
    forged = mint_token(load_signing_key(tmp_path / "forger", kid), session_id="probe-forged",
                        now=time.time())
    code, out, err = run(capsys, "--url", ws_url(relay.port), "--token", forged)
    assert (code, out) == (4, "")
    assert err == "probe failed at connect-host: 401 token_invalid\n"
    assert forged not in err


def test_a_relay_that_is_not_listening_exits_4(
        key_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    path = tmp_path / "probe.prom"
    code, _, err = run(capsys, "--url", ws_url(port), "--keys", str(key_dir),
                       "--metrics-file", str(path))
    assert code == 4
    assert err == (f"probe failed at connect-host: cannot connect to 127.0.0.1:{port}: "
                   "Connection refused\n")
    found = metrics(path.read_text())
    target = {"target": ws_url(port)}
    assert found["beach_rescue_probe_success"] == [(target, 0.0)]
    assert found["beach_rescue_probe_failure_step"] == [
        ({**target, "step": "connect-host", "exit_code": "4"}, 1.0)]
    assert "beach_rescue_probe_rtt_seconds" not in found


def test_a_relay_that_never_answers_exits_6(
        key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:  # accepts in the kernel backlog, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        code, _, err = run(capsys, "--url", ws_url(listener.getsockname()[1]),
                           "--keys", str(key_dir), "--timeout", "0.5")
    assert (code, err) == (6, "probe failed at connect-host: no answer within 0.5s\n")


async def test_a_full_session_exits_5_at_the_participant_hello(
        relay_factory: Callable[..., RelayProcess], key_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    full = relay_factory(max_participants=1)
    session = "probe-full-session"
    async with aiohttp.ClientSession() as http:
        occupant = await join(http, full, session, "participant", "occupant")
        code, out, err = await run_async(capsys, "--url", ws_url(full.port), "--keys",
                                         str(key_dir), "--session", session, "--json")
        assert (await occupant.recv_event())["type"] == "peer_joined"  # the probe's host
        await occupant.close()
    assert code == 5
    assert err == "probe failed at hello-participant: closed 4003 SESSION_FULL\n"
    doc = json.loads(out)
    assert (doc["step"], doc["session_id"]) == ("hello-participant", session)
    assert doc["connection_ids"]["host"] and doc["connection_ids"]["participant"] is None


def test_the_console_script_prints_prometheus_text(
        relay: RelayProcess, key_dir: Path) -> None:
    script = Path(sys.executable).parent / "beach-rescue"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEACH_RESCUE_")}
    done = subprocess.run([str(script), "probe", "--url", ws_url(relay.port), "--keys",
                           str(key_dir), "--frames", "2", "--push-text"],
                          capture_output=True, text=True, timeout=30, env=env, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    found = metrics(done.stdout)
    assert found["beach_rescue_probe_success"] == [({"target": ws_url(relay.port)}, 1.0)]


# --- against a fake relay that misbehaves ------------------------------------------------


@pytest.fixture
async def fake_relay() -> AsyncIterator[Callable[[str], Awaitable[int]]]:
    """Start a minimal relay that breaks the contract in the way named by ``mode``."""
    servers: list[TestServer] = []

    async def start(mode: str) -> int:
        peers: dict[str, tuple[str, web.WebSocketResponse]] = {}

        async def handle(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            hello = json.loads(await ws.receive_str())
            nonce = "A" * 22 + "==" if mode == "bad-ack" else hello["client_nonce"]
            role = hello["role"]
            other = "participant" if role == "host" else "host"
            await ws.send_str(encode_server_hello(
                ack_nonce=nonce, server_nonce=new_server_nonce(), heartbeat_s=15,
                connection_id=f"fake-{role}", host_present=other in peers, participants=0))
            peers[role] = (hello["peer_id"], ws)
            if other in peers:
                await peers[other][1].send_str(encode_peer_joined(role, hello["peer_id"]))
                await ws.send_str(encode_peer_joined(other, peers[other][0]))
            async for message in ws:
                data: bytes = message.data
                if data[1] == Kind.HEARTBEAT:
                    if mode != "mute-heartbeat":
                        await ws.send_bytes(data)
                elif other in peers:
                    if mode == "alter":
                        data = data[:-1] + bytes([data[-1] ^ 0xFF])
                    await peers[other][1].send_bytes(data)
                    if mode == "duplicate":
                        await peers[other][1].send_bytes(data)
            return ws

        app = web.Application()
        app.router.add_get("/ws", handle)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return server.port

    yield start
    for server in servers:
        await server.close()


@pytest.mark.parametrize(("mode", "expected"), [
    ("bad-ack", (5, "hello-host: server_hello: ack_nonce does not echo the client_nonce")),
    ("alter", (5, "relay: frame 1 (host->participant) arrived altered (data frame of 40 "
                  "bytes, 40 sent)")),
    ("duplicate", (5, "relay: frame 2 (host->participant): out of order, frame 1 arrived "
                      "instead")),
    ("mute-heartbeat", (6, "heartbeat: heartbeat 1 echo (host) not received within 0.5s")),
])
async def test_a_relay_breaking_the_contract_fails_with_the_step_and_class(
        fake_relay: Callable[[str], Awaitable[int]], key_dir: Path,
        capsys: pytest.CaptureFixture[str], mode: str, expected: tuple[int, str]) -> None:
    port = await fake_relay(mode)
    timeout = "0.5" if expected[0] == 6 else "10"  # only the timeout case waits it out
    code, _, err = await run_async(capsys, "--url", ws_url(port), "--keys", str(key_dir),
                                   "--timeout", timeout)
    assert (code, err) == (expected[0], f"probe failed at {expected[1]}\n")


# --- usage and the shipped systemd unit --------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--url", "ws://x/ws", "--frames", "0"], "--frames must be 1 to 400"),
    (["--url", "ws://x/ws", "--frames", "401"], "--frames must be 1 to 400"),
    (["--url", "ws://x/ws", "--timeout", "0"], "--timeout must be a positive"),
    (["--keys", "k"], "--url is required unless --control-plane"),
    (["--url", "ws://x/ws", "--service-key", "k"], "go with --control-plane"),
    (["--url", "ws://x/ws", "--session", "no spaces"], "--session must be 1-128"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                             message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("beach-rescue probe: ") and message in err


# --- pure helpers ------------------------------------------------------------------------


def server_hello(nonce: str, **overrides: Any) -> ServerHello:
    fields: dict[str, Any] = {
        "ack_nonce": nonce, "server_nonce": new_server_nonce(), "heartbeat_s": 15,
        "connection_id": "c-1", "host_present": True, "participants": 0}
    fields.update(overrides)
    message = parse_server_message(encode_server_hello(**fields))
    assert isinstance(message, ServerHello)
    return message


def test_check_server_hello_names_what_is_wrong() -> None:
    nonce = base64.b64encode(b"0123456789abcdef").decode()
    assert probe.check_server_hello(server_hello(nonce), nonce) is None
    assert probe.check_server_hello(server_hello(nonce), "B" * 22 + "==") == \
        "ack_nonce does not echo the client_nonce"
    assert probe.check_server_hello(server_hello(nonce, server_nonce="c2hvcnQ="), nonce) == \
        "server_nonce is not base64 of 16 bytes"
    assert probe.check_server_hello(server_hello(nonce, connection_id=""), nonce) == \
        "connection_id is empty"
    assert probe.check_server_hello(server_hello(nonce, heartbeat_s=0), nonce) == \
        "heartbeat_s 0 is not positive"


def test_session_of_token_reads_the_sid_without_verifying(signing_key: SigningKey) -> None:
    token = mint_token(signing_key, session_id="s-42", now=time.time())
    assert probe.session_of_token(token) == "s-42"
    assert probe.session_of_token("not.a.jwt") is None


def test_relay_target_drops_the_token_and_credentials() -> None:
    url = probe.relay_target("wss://user:pw@relay.example.net/ws?token=SECRET&x=1")
    assert str(url) == "wss://relay.example.net/ws?x=1"
