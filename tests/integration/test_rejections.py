"""Every refusal of the contract, end to end: the status or close code, the body or reason.

Before the upgrade a refusal is an HTTP response with a JSON body ``{"error", "detail"}``
(protocol section 3); after it, a WebSocket close with the code and reason string of
section 6. After each refusal a fresh host/participant pair must still be served.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rescue.frames import Kind, encode_frame
from rescue.keys import SigningKey, generate_keypair, load_signing_key
from rescue.tokens import mint_token
from tests.support.client import TestPeer, client_hello, join, open_ws
from tests.support.probes import (
    assert_refusal,
    assert_still_serving,
    hello_outcome,
    open_pending,
    unique_session,
    upgrade_get,
    wait_for_connections,
)
from tests.support.relay import RelayProcess

RelayFactory = Callable[..., RelayProcess]

# Every token handed to the shared relay in this module, for the log check at its end.
_TOKENS: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def _shared_relay_never_logs_tokens(relay: RelayProcess) -> Iterator[None]:
    """After the module, stop the shared relay and check its whole log for tokens."""
    yield
    if _TOKENS:  # some test of this module ran
        relay.stop()
        _assert_no_token_in(relay.lines, _TOKENS)


_ANY_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _assert_no_token_in(lines: list[str], tokens: set[str]) -> None:
    assert tokens
    for line in lines:
        assert "token=" not in line, line
        assert not _ANY_JWT.search(line), line
        for token in tokens:
            assert token not in line, line
            signature = token.rsplit(".", 1)[-1]
            if len(signature) >= 16:  # the signature alone would identify the token too
                assert signature not in line, line


def mint(relay: RelayProcess, session_id: str, **kwargs: Any) -> str:
    """``relay.mint`` that remembers the token for the log check."""
    token = relay.mint(session_id, **kwargs)
    _TOKENS.add(token)
    return token


@pytest.fixture
def foreign_key(tmp_path: Path) -> SigningKey:
    """A signing key the relays do not trust."""
    generate_keypair(tmp_path / "foreign")
    return load_signing_key(tmp_path / "foreign")


# --- before the upgrade: request shape -------------------------------------------------------


@pytest.mark.parametrize("query", [
    "",
    "?token=x",
    "?session=",
    "?session=" + "a" * 129,
    "?session=bad/char",
    "?session=bad%20space",
    "?session=%C3%BCml",
], ids=["missing", "missing-with-token", "empty", "too-long", "slash", "space", "non-ascii"])
async def test_an_invalid_session_is_bad_request(relay: RelayProcess,
                                                 http: aiohttp.ClientSession,
                                                 query: str) -> None:
    refused = await upgrade_get(http, relay.http_url("/ws" + query))
    assert_refusal(refused, 400, "bad_request")
    await assert_still_serving(relay, http)


async def test_the_longest_session_id_is_accepted(relay: RelayProcess,
                                                  http: aiohttp.ClientSession) -> None:
    session_id = "A-z_0.9" * 18 + "xx"
    assert len(session_id) == 128
    host = await join(http, relay, session_id, "host", "h", token=mint(relay, session_id))
    assert host.server_hello["type"] == "server_hello"
    await host.close()


async def test_no_token_is_token_missing(relay: RelayProcess,
                                         http: aiohttp.ClientSession) -> None:
    assert_refusal(await upgrade_get(http, relay.ws_url("nt", None)), 401, "token_missing")
    refused = await upgrade_get(http, relay.ws_url("nt", None),
                                headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_refusal(refused, 401, "token_missing")
    await assert_still_serving(relay, http)


async def test_a_bearer_token_works_like_the_query_token(relay: RelayProcess,
                                                         http: aiohttp.ClientSession) -> None:
    session_id = unique_session("bearer")
    token = mint(relay, session_id)
    ws = await open_ws(http, relay.ws_url(session_id, None),
                       headers={"Authorization": f"Bearer {token}"})
    await ws.send_str(client_hello(session_id, "host", "bearer-h"))
    msg = await ws.receive(timeout=10)
    assert json.loads(msg.data)["type"] == "server_hello"
    part = await join(http, relay, session_id, "participant", "bearer-p",
                      token=mint(relay, session_id))
    await part.send_frame(b"via bearer")
    while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
        pass  # peer_joined
    assert msg.data[8:] == b"via bearer"
    await ws.close()
    await part.close()


# --- before the upgrade: tokens ----------------------------------------------------------


async def test_a_forged_token_with_the_trusted_kid_is_invalid(
        relay: RelayProcess, http: aiohttp.ClientSession, foreign_key: SigningKey) -> None:
    forger = SigningKey(relay.signing_key.kid, foreign_key.private_key)
    token = mint_token(forger, session_id="forged", now=time.time())
    _TOKENS.add(token)
    assert_refusal(await upgrade_get(http, relay.ws_url("forged", token)), 401, "token_invalid")
    await assert_still_serving(relay, http)


async def test_an_unknown_kid_is_invalid(relay: RelayProcess, http: aiohttp.ClientSession,
                                         foreign_key: SigningKey) -> None:
    token = mint_token(foreign_key, session_id="unknown-kid", now=time.time())
    _TOKENS.add(token)
    refused = await upgrade_get(http, relay.ws_url("unknown-kid", token))
    assert_refusal(refused, 401, "token_invalid")
    await assert_still_serving(relay, http)


@pytest.mark.parametrize("garbage", [
    "garbage-7f3a9c", "aaaa.bbbb.cccc", "eyJhbGciOiJub25lIn0.eyJzaWQiOiJnIn0.", "x" * 8000,
])
async def test_a_garbage_token_is_invalid(relay: RelayProcess, http: aiohttp.ClientSession,
                                          garbage: str) -> None:
    _TOKENS.add(garbage)
    refused = await upgrade_get(http, relay.ws_url("garbage", garbage))
    assert_refusal(refused, 401, "token_invalid")
    await assert_still_serving(relay, http)


async def test_an_expired_token_is_token_expired(relay: RelayProcess,
                                                 http: aiohttp.ClientSession) -> None:
    token = mint(relay, "expired", now=time.time() - 1000, ttl_s=300)
    assert_refusal(await upgrade_get(http, relay.ws_url("expired", token)), 401, "token_expired")
    await assert_still_serving(relay, http)


async def test_a_token_not_yet_valid_is_invalid(relay: RelayProcess,
                                                http: aiohttp.ClientSession) -> None:
    token = mint(relay, "future", now=time.time() + 1000)
    assert_refusal(await upgrade_get(http, relay.ws_url("future", token)), 401, "token_invalid")
    await assert_still_serving(relay, http)


async def test_a_token_for_another_audience_is_invalid(relay: RelayProcess,
                                                       http: aiohttp.ClientSession) -> None:
    token = mint(relay, "aud", audience="someone-else")
    assert_refusal(await upgrade_get(http, relay.ws_url("aud", token)), 401, "token_invalid")
    await assert_still_serving(relay, http)


async def test_a_token_for_another_session_is_session_mismatch(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    token = mint(relay, "session-A")
    refused = await upgrade_get(http, relay.ws_url("session-B", token))
    assert_refusal(refused, 403, "session_mismatch")
    await assert_still_serving(relay, http)


async def test_a_token_without_the_fallback_capability_is_not_entitled(
        relay: RelayProcess, http: aiohttp.ClientSession, relay_factory: RelayFactory) -> None:
    session_id = unique_session("nocap")
    token = mint(relay, session_id, caps=("telemetry",))
    assert_refusal(await upgrade_get(http, relay.ws_url(session_id, token)), 403, "not_entitled")
    await assert_still_serving(relay, http)

    lenient = relay_factory(entitlement_checks=False)
    host = await join(http, lenient, session_id, "host", "h", token=token)
    part = await join(http, lenient, session_id, "participant", "p", token=token)
    await part.send_frame(b"entitled enough")
    assert (await host.recv_frame()).payload == b"entitled enough"
    await host.close()
    await part.close()


# --- before the upgrade: routes and methods ------------------------------------------------


async def test_an_unknown_path_is_not_found(relay: RelayProcess,
                                            http: aiohttp.ClientSession) -> None:
    assert_refusal(await upgrade_get(http, relay.http_url("/nope"), upgrade=False),
                   404, "not_found")
    assert_refusal(await upgrade_get(http, relay.http_url("/ws/extra?session=s")),
                   404, "not_found")
    await assert_still_serving(relay, http)


async def test_post_to_ws_is_method_not_allowed(relay: RelayProcess,
                                                http: aiohttp.ClientSession) -> None:
    token = mint(relay, "post")
    refused = await upgrade_get(http, relay.ws_url("post", token), method="POST", upgrade=False)
    assert_refusal(refused, 405, "method_not_allowed")
    await assert_still_serving(relay, http)


async def test_method_not_allowed_names_the_allowed_methods(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    # RFC 9110 section 15.5.6: a 405 must carry Allow. Every route is a GET (HEAD comes
    # with it), so that is all Allow may list.
    for path in ("/ws?session=allow", "/healthz"):
        refused = await upgrade_get(http, relay.http_url(path), method="POST", upgrade=False)
        assert_refusal(refused, 405, "method_not_allowed")
        allowed = {m.strip() for m in refused.headers.get("Allow", "").split(",")}
        assert allowed == {"GET", "HEAD"}, refused.headers
    await assert_still_serving(relay, http)


async def test_get_ws_without_upgrade_is_upgrade_required(relay: RelayProcess,
                                                          http: aiohttp.ClientSession) -> None:
    token = mint(relay, "plain")
    refused = await upgrade_get(http, relay.ws_url("plain", token), upgrade=False)
    assert_refusal(refused, 426, "upgrade_required")
    await assert_still_serving(relay, http)


# --- before the upgrade: capacity ----------------------------------------------------------


def _retry_after(refused_headers: dict[str, str]) -> int:
    value = int(refused_headers["Retry-After"])
    assert value > 0
    return value


async def test_the_per_session_connection_cap_is_rate_limited(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    # The smallest cap the configuration allows: max_participants + 2.
    capped = relay_factory(max_participants=1, max_connections_per_session=3)
    session_id = unique_session("cap")
    pending = [await open_pending(http, capped, session_id) for _ in range(3)]
    refused = await upgrade_get(http, capped.ws_url(session_id, capped.mint(session_id)))
    assert_refusal(refused, 429, "rate_limited")
    # Another session is not affected.
    await assert_still_serving(capped, http)
    for ws in pending:
        await ws.close()
    await wait_for_connections(capped, http, 0)
    host = await join(http, capped, session_id, "host", "h")
    await host.close()


async def test_the_connection_cap_is_overloaded_with_retry_after(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    capped = relay_factory(max_connections=2)
    pending = [await open_pending(http, capped, unique_session("full")) for _ in range(2)]
    session_id = unique_session("full")
    refused = await upgrade_get(http, capped.ws_url(session_id, capped.mint(session_id)))
    assert_refusal(refused, 503, "overloaded")
    _retry_after(refused.headers)
    for ws in pending:
        await ws.close()
    await wait_for_connections(capped, http, 0)
    await assert_still_serving(capped, http)


async def test_the_handshake_cap_is_overloaded_with_retry_after(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    capped = relay_factory(max_handshakes=1)
    session_id = unique_session("hs")
    pending = await open_pending(http, capped, session_id)
    other = unique_session("hs")
    refused = await upgrade_get(http, capped.ws_url(other, capped.mint(other)))
    assert_refusal(refused, 503, "overloaded")
    _retry_after(refused.headers)
    # Once the pending connection finishes its hello, the slot is free again.
    await pending.send_str(client_hello(session_id, "host", "hs-h"))
    assert json.loads((await pending.receive(timeout=10)).data)["type"] == "server_hello"
    await assert_still_serving(capped, http)
    await pending.close()


# --- after the upgrade: the hello ------------------------------------------------------------


async def test_no_hello_in_time_is_handshake_timeout(relay: RelayProcess,
                                                     http: aiohttp.ClientSession) -> None:
    session_id = unique_session("slow")
    ws = await open_ws(http, relay.ws_url(session_id, mint(relay, session_id)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    msg = await ws.receive(timeout=10)
    elapsed = loop.time() - started
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001,
                                               "HANDSHAKE_TIMEOUT")
    assert 1.0 <= elapsed < 5.0  # handshake_timeout_s is 2 in FAST_SETTINGS
    await ws.close()
    await assert_still_serving(relay, http)


def _hello(session_id: str, **overrides: object) -> str:
    hello = json.loads(client_hello(session_id, "participant", "p-bad"))
    hello.update(overrides)
    return json.dumps(hello)


def _hello_without(session_id: str, field: str) -> str:
    hello = json.loads(_hello(session_id))
    del hello[field]
    return json.dumps(hello)


BAD_HELLOS: dict[str, Callable[[str], str | bytes]] = {
    "not-json": lambda s: '{"type": "client_hello", ',
    "json-array": lambda s: "[1, 2, 3]",
    "missing-peer-id": lambda s: _hello_without(s, "peer_id"),
    "missing-role": lambda s: _hello_without(s, "role"),
    "missing-nonce": lambda s: _hello_without(s, "client_nonce"),
    "wrong-type": lambda s: _hello(s, type="server_hello"),
    "protocol-version-2": lambda s: _hello(s, protocol_version=2),
    "protocol-version-0": lambda s: _hello(s, protocol_version=0),
    "bad-role": lambda s: _hello(s, role="admin"),
    "short-nonce": lambda s: _hello(s, client_nonce="AAAA"),
    "nonce-not-base64": lambda s: _hello(s, client_nonce="!" * 22 + "=="),
    "no-none-compression": lambda s: _hello(s, compression=["zstd"]),
    "bad-peer-id": lambda s: _hello(s, peer_id="a b"),
    "binary-before-hello": lambda s: _hello(s).encode(),
}


@pytest.mark.parametrize("case", list(BAD_HELLOS))
async def test_a_bad_hello_is_protocol_error(relay: RelayProcess, http: aiohttp.ClientSession,
                                             case: str) -> None:
    session_id = unique_session("hello")
    outcome = await hello_outcome(http, relay, session_id, BAD_HELLOS[case](session_id),
                                  token=mint(relay, session_id))
    assert outcome == (4000, "PROTOCOL_ERROR")
    await assert_still_serving(relay, http)


async def test_a_hello_for_another_session_is_session_mismatch(
        relay: RelayProcess, http: aiohttp.ClientSession) -> None:
    session_id = unique_session("mm")
    outcome = await hello_outcome(http, relay, session_id, _hello("some-other-session"),
                                  token=mint(relay, session_id))
    assert outcome == (4002, "SESSION_MISMATCH")
    await assert_still_serving(relay, http)


async def test_a_token_expiring_before_the_hello_is_token_expired(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    strict = relay_factory(token_leeway_s=0, handshake_timeout_s=5)
    session_id = unique_session("exp")
    now = time.time()
    token = strict.mint(session_id, ttl_s=2, now=now)
    exp = int(now) + 2  # at least one second away: time enough to upgrade
    ws = await open_ws(http, strict.ws_url(session_id, token))
    # Waiting for the expiry is the condition under test, not a synchronisation.
    deadline = time.monotonic() + 5
    while time.time() <= exp + 0.05:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await ws.send_str(_hello(session_id))
    msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4009, "TOKEN_EXPIRED")
    await ws.close()
    await assert_still_serving(strict, http)


async def test_a_participant_past_the_limit_is_session_full(
        relay_factory: RelayFactory, http: aiohttp.ClientSession) -> None:
    small = relay_factory(max_participants=1)
    session_id = unique_session("full")
    host = await join(http, small, session_id, "host", "h")
    first = await join(http, small, session_id, "participant", "p1")
    outcome = await hello_outcome(http, small, session_id, peer_id="p2")
    assert outcome == (4003, "SESSION_FULL")
    # The session itself is intact.
    await host.send_frame(b"still here")
    assert (await first.recv_frame()).payload == b"still here"
    await host.close()
    await first.close()
    await assert_still_serving(small, http)


# --- after the hello: frames -------------------------------------------------------------


async def _joined_pair(relay: RelayProcess, http: aiohttp.ClientSession, prefix: str
                       ) -> tuple[TestPeer, TestPeer]:
    session_id = unique_session(prefix)
    host = await join(http, relay, session_id, "host", "h", token=mint(relay, session_id))
    part = await join(http, relay, session_id, "participant", "p",
                      token=mint(relay, session_id))
    assert await host.recv_event() == {"type": "peer_joined", "role": "participant",
                                       "peer_id": "p"}
    return host, part


BAD_FRAMES: dict[str, tuple[bytes | str, int, str]] = {
    "text-after-hello": ('{"type": "client_hello"}', 1003, "UNSUPPORTED_DATA"),
    "unknown-kind-9": (struct.pack(">BBHI", 1, 9, 0, 1), 1003, "UNSUPPORTED_DATA"),
    "version-2": (struct.pack(">BBHI", 2, 1, 3, 1) + b"abc", 4000, "PROTOCOL_ERROR"),
    "version-0": (struct.pack(">BBHI", 0, 1, 0, 1), 4000, "PROTOCOL_ERROR"),
    "length-too-big": (struct.pack(">BBHI", 1, 1, 4, 1) + b"abc", 4000, "PROTOCOL_ERROR"),
    "length-too-small": (struct.pack(">BBHI", 1, 1, 2, 1) + b"abc", 4000, "PROTOCOL_ERROR"),
    "seven-bytes": (b"\x01\x01\x00\x00\x00\x00\x00", 4000, "PROTOCOL_ERROR"),
    "one-byte": (b"\x01", 4000, "PROTOCOL_ERROR"),
    "empty": (b"", 4000, "PROTOCOL_ERROR"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_a_bad_message_after_the_hello_closes_the_sender(
        relay: RelayProcess, http: aiohttp.ClientSession, case: str) -> None:
    data, code, reason = BAD_FRAMES[case]
    host, part = await _joined_pair(relay, http, "frame")
    if isinstance(data, str):
        await part.ws.send_str(data)
    else:
        await part.send_raw(data)
    assert await part.recv_close() == (code, reason)
    # The bad message was not forwarded; the host hears that its participant was evicted.
    assert await host.recv_event() == {
        "type": "peer_left", "role": "participant", "peer_id": "p", "reason": "evicted"}
    await host.close()
    await assert_still_serving(relay, http)


async def test_an_oversize_message_is_message_too_big(relay: RelayProcess,
                                                      http: aiohttp.ClientSession) -> None:
    host, part = await _joined_pair(relay, http, "big")
    largest = encode_frame(Kind.DATA, 1, bytes(65535))
    await host.send_raw(largest)
    assert (await part.recv_frame()).payload == bytes(65535)
    await host.send_raw(largest + bytes(2))  # 65545 bytes: one over the limit
    assert await host.recv_close() == (1009, "MESSAGE_TOO_BIG")
    while (event := await part.recv_event())["type"] == "peer_joined":
        pass
    assert (event["type"], event["role"]) == ("peer_left", "host")
    await part.close()
    await assert_still_serving(relay, http)


@pytest.fixture
def limited(relay_factory: RelayFactory) -> RelayProcess:
    return relay_factory(rate_messages_per_s=10, rate_messages_burst=20,
                         rate_bytes_per_s=1000, rate_bytes_burst=65544)


async def test_a_message_flood_is_rate_limited(limited: RelayProcess,
                                               http: aiohttp.ClientSession) -> None:
    host, part = await _joined_pair(limited, http, "flood")
    for _ in range(50):
        await host.send_frame(b"x")
    assert await host.recv_close() == (4007, "RATE_LIMITED")
    received = 0
    while True:
        msg = await part.ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.TEXT:
            event = json.loads(msg.data)
            if event["type"] == "peer_joined":
                continue
            assert event == {"type": "peer_left", "role": "host", "peer_id": "h",
                             "reason": "evicted"}
            break
        assert msg.type is aiohttp.WSMsgType.BINARY
        received += 1
    assert 20 <= received < 50  # the burst passed, the rest did not
    await part.close()
    await assert_still_serving(limited, http)


async def test_a_byte_flood_is_rate_limited(limited: RelayProcess,
                                            http: aiohttp.ClientSession) -> None:
    host, part = await _joined_pair(limited, http, "bytes")
    for _ in range(3):  # 3 x 30008 bytes: over the 65544-byte burst, under 20 messages
        await host.send_frame(bytes(30000))
    assert await host.recv_close() == (4007, "RATE_LIMITED")
    assert len((await part.recv_frame()).payload) == 30000
    await part.close()
    await assert_still_serving(limited, http)


# --- logs ------------------------------------------------------------------------------


async def test_refusals_never_log_the_token(relay_factory: RelayFactory,
                                            http: aiohttp.ClientSession,
                                            foreign_key: SigningKey) -> None:
    logged = relay_factory(max_participants=1, log_level="debug")
    session_id = unique_session("log")
    tokens = {
        "expired": logged.mint(session_id, now=time.time() - 1000),
        "mismatch": logged.mint("other-session"),
        "not-entitled": logged.mint(session_id, caps=()),
        "foreign": mint_token(foreign_key, session_id=session_id, now=time.time()),
        "valid": logged.mint(session_id),
    }
    for name in ("expired", "mismatch", "not-entitled", "foreign"):
        await upgrade_get(http, logged.ws_url(session_id, tokens[name]))
        await upgrade_get(http, logged.ws_url(session_id, None),
                          headers={"Authorization": f"Bearer {tokens[name]}"})
    await upgrade_get(http, logged.ws_url(session_id, tokens["valid"]), upgrade=False)
    # A request line over aiohttp's limit is refused by the HTTP parser, which quotes it.
    too_long = await upgrade_get(http, logged.ws_url(session_id, tokens["valid"])
                                 + "&pad=" + "x" * 9000)
    assert too_long.status == 400
    assert await hello_outcome(http, logged, session_id, "nope",
                               token=tokens["valid"]) == (4000, "PROTOCOL_ERROR")
    host = await join(http, logged, session_id, "host", "h", token=tokens["valid"])
    part = await join(http, logged, session_id, "participant", "p1", token=tokens["valid"])
    assert await hello_outcome(http, logged, session_id, token=tokens["valid"],
                               peer_id="p2") == (4003, "SESSION_FULL")
    await part.close()
    await host.close()
    logged.stop()  # every line is in once the process has exited
    assert len(logged.events("upgrade.refused")) == 9
    assert len(logged.events("hello.refused")) == 2
    _assert_no_token_in(logged.lines, set(tokens.values()))
