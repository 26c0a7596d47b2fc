"""Tests for rescue.client.webrtc: real aiortc data channels on this machine's interfaces.

Success paths connect a host and a participant in one event loop; failure paths tamper
with the signalling (drop the offer, strip or redirect the ICE candidates). Every test
checks that closing leaves no asyncio task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest

from rescue.client.ladder import Reason
from rescue.client.transport import MessageChannel, TransportKind
from rescue.client.webrtc import (
    HIGH_WATER,
    ChannelClosed,
    IceServer,
    PrimaryFailed,
    Signalling,
    WebRtcChannel,
    open_webrtc,
    signalling_pair,
)

OPEN_TIMEOUT_S = 10.0     # generous: the success path normally opens in well under 1 s
FAIL_TIMEOUT_S = 1.5      # what the forced-failure tests give an attempt
SLACK_S = 3.0             # scheduling noise allowed on top of a timeout (2 noisy cores)
CHUNK = 16 * 1024

CANDIDATE = re.compile(r"^a=candidate:.*\r?\n", re.MULTILINE)
CANDIDATE_ADDRESS = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)", re.MULTILINE)


def open_sockets() -> set[str]:
    """This process's open sockets (Linux), as /proc/self/fd link targets."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """After the test, every task aiortc started has finished and its sockets are closed."""
    tasks, sockets = asyncio.all_tasks(), open_sockets()
    yield
    me = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() - tasks if t is not me}
    if left:
        await asyncio.wait(left, timeout=5.0)  # bounded wait for them to end, no polling
    assert [t for t in left if not t.done()] == []
    assert open_sockets() - sockets == set()


class Tampering:
    """A signalling end that rewrites the SDP of every message it sends (None drops it)."""

    def __init__(self, inner: Signalling, rewrite: Callable[[str], str | None]) -> None:
        self.inner = inner
        self.rewrite = rewrite
        self.sent: list[str] = []

    async def send(self, message: dict[str, str]) -> None:
        self.sent.append(message["type"])
        sdp = self.rewrite(message["sdp"])
        if sdp is not None:
            await self.inner.send({**message, "sdp": sdp})

    async def receive(self) -> dict[str, str]:
        return await self.inner.receive()


def strip_candidates(sdp: str) -> str:
    return CANDIDATE.sub("", sdp)


def redirect_candidates(sdp: str) -> str:
    """Point every candidate at UDP port 9 (discard) of its address: checks go unanswered."""
    return CANDIDATE_ADDRESS.sub(lambda m: f"{m.group(1)}{m.group(2)} 9", sdp)


async def open_pair(timeout_s: float = OPEN_TIMEOUT_S) -> tuple[WebRtcChannel, WebRtcChannel]:
    a, b = signalling_pair()
    return await asyncio.gather(open_webrtc("host", a, timeout_s=timeout_s),
                                open_webrtc("participant", b, timeout_s=timeout_s))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WebRtcChannel, WebRtcChannel]]:
    host, participant = await open_pair()
    yield host, participant
    await asyncio.gather(host.close(), participant.close())


def chunk(tag: int, index: int) -> bytes:
    """A 16 KiB message saying who sent it and its place in the stream."""
    head = f"{tag}:{index:06d}:".encode()
    return head + bytes([index % 251]) * (CHUNK - len(head))


async def send_all(channel: WebRtcChannel, tag: int, count: int) -> None:
    for i in range(count):
        await channel.send(chunk(tag, i))


async def receive(channel: WebRtcChannel, count: int) -> list[bytes]:
    got: list[bytes] = []
    async for message in channel:
        got.append(message)
        if len(got) == count:
            break
    return got


async def test_host_and_participant_exchange_a_mebibyte_in_order(
        pair: tuple[WebRtcChannel, WebRtcChannel]) -> None:
    host, participant = pair
    assert isinstance(host, MessageChannel)
    assert host.transport is participant.transport is TransportKind.WEBRTC
    count = 32  # 32 x 16 KiB each way: 1 MiB in total
    _, _, to_participant, to_host = await asyncio.wait_for(asyncio.gather(
        send_all(host, 1, count), send_all(participant, 2, count),
        receive(participant, count), receive(host, count)), 60)
    assert to_participant == [chunk(1, i) for i in range(count)]
    assert to_host == [chunk(2, i) for i in range(count)]


async def test_empty_and_maximal_messages_pass(
        pair: tuple[WebRtcChannel, WebRtcChannel]) -> None:
    host, participant = pair
    big = bytes(range(256)) * 256  # 64 KiB, the relay's own frame limit
    await host.send(b"")
    await host.send(big)
    assert await asyncio.wait_for(receive(participant, 2), 30) == [b"", big]


async def test_send_waits_while_the_buffer_is_over_the_high_water_mark(
        pair: tuple[WebRtcChannel, WebRtcChannel]) -> None:
    host, participant = pair
    peak = 0
    count = 64  # 1 MiB, four times the high-water mark, nobody reading yet

    async def sender() -> None:
        nonlocal peak
        for i in range(count):
            await host.send(chunk(1, i))
            peak = max(peak, host.buffered_amount)

    sending = asyncio.create_task(sender())
    got = await asyncio.wait_for(receive(participant, count), 60)
    await sending
    assert got == [chunk(1, i) for i in range(count)]
    assert HIGH_WATER < peak <= HIGH_WATER + CHUNK  # it filled up, and no further


async def test_close_delivers_queued_messages_then_ends_the_peers_stream() -> None:
    host, participant = await open_pair()
    count = 24
    for i in range(count):  # queue them all, then close at once
        await host.send(chunk(1, i))
    await host.close()
    got = await asyncio.wait_for(receive(participant, count + 1), 30)  # ends by itself
    assert got == [chunk(1, i) for i in range(count)]
    await host.close()  # idempotent
    with pytest.raises(ChannelClosed):
        await host.send(b"late")
    await participant.close()
    with pytest.raises(ChannelClosed):
        await participant.send(b"late")
    assert [m async for m in participant] == []


async def test_participant_that_closes_ends_the_hosts_stream(
        pair: tuple[WebRtcChannel, WebRtcChannel]) -> None:
    host, participant = pair
    await participant.send(b"bye")
    await participant.close()
    assert await asyncio.wait_for(receive(host, 2), 30) == [b"bye"]


async def test_no_answer_fails_within_the_timeout() -> None:
    a, _ = signalling_pair()
    dropping = Tampering(a, lambda sdp: None)
    started = time.monotonic()
    with pytest.raises(PrimaryFailed) as raised:
        await open_webrtc("host", dropping, timeout_s=FAIL_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert raised.value.reason is Reason.NO_ANSWER
    assert dropping.sent == ["offer"]
    assert FAIL_TIMEOUT_S * 0.9 <= elapsed < FAIL_TIMEOUT_S + SLACK_S


async def test_participant_without_an_offer_reports_no_answer() -> None:
    _, b = signalling_pair()
    with pytest.raises(PrimaryFailed) as raised:
        await open_webrtc("participant", b, timeout_s=0.3)
    assert raised.value.reason is Reason.NO_ANSWER


async def test_blocked_ice_fails_the_host_fast_and_the_participant_in_time() -> None:
    a, b = signalling_pair()
    started = time.monotonic()
    results = await asyncio.gather(
        open_webrtc("host", Tampering(a, strip_candidates), timeout_s=FAIL_TIMEOUT_S),
        open_webrtc("participant", Tampering(b, strip_candidates), timeout_s=FAIL_TIMEOUT_S),
        return_exceptions=True)
    assert all(isinstance(r, PrimaryFailed) for r in results), results
    host_error, participant_error = results
    assert isinstance(host_error, PrimaryFailed)
    assert isinstance(participant_error, PrimaryFailed)
    assert host_error.reason is Reason.ICE_FAILED
    assert participant_error.reason in {Reason.ICE_FAILED, Reason.PRIMARY_TIMEOUT}
    assert time.monotonic() - started < FAIL_TIMEOUT_S + SLACK_S


async def test_unanswered_connectivity_checks_time_out() -> None:
    a, b = signalling_pair()
    results = await asyncio.gather(
        open_webrtc("host", Tampering(a, redirect_candidates), timeout_s=FAIL_TIMEOUT_S),
        open_webrtc("participant", Tampering(b, redirect_candidates),
                    timeout_s=FAIL_TIMEOUT_S),
        return_exceptions=True)
    reasons = [r.reason if isinstance(r, PrimaryFailed) else r for r in results]
    assert reasons == [Reason.PRIMARY_TIMEOUT, Reason.PRIMARY_TIMEOUT]


async def test_a_wrong_signalling_message_is_a_signalling_failure() -> None:
    a, b = signalling_pair()
    await a.send({"type": "answer", "sdp": "v=0"})  # the participant expects an offer
    with pytest.raises(PrimaryFailed) as raised:
        await open_webrtc("participant", b, timeout_s=OPEN_TIMEOUT_S)
    assert raised.value.reason is Reason.SIGNALLING_FAILED


async def test_an_unusable_offer_is_a_signalling_failure() -> None:
    a, b = signalling_pair()
    await a.send({"type": "offer", "sdp": "this is not SDP"})
    with pytest.raises(PrimaryFailed) as raised:
        await open_webrtc("participant", b, timeout_s=OPEN_TIMEOUT_S)
    assert raised.value.reason is Reason.SIGNALLING_FAILED


class Waiting:
    """A signalling end whose receive never returns; ``receiving`` is set once it is called."""

    def __init__(self) -> None:
        self.receiving = asyncio.Event()

    async def send(self, message: dict[str, str]) -> None:
        raise AssertionError("nothing should be sent")

    async def receive(self) -> dict[str, str]:
        self.receiving.set()
        await asyncio.Future()  # forever
        raise AssertionError("unreachable")


async def test_cancelled_opening_closes_its_connection() -> None:
    waiting = Waiting()
    opening = asyncio.create_task(open_webrtc("participant", waiting,
                                              timeout_s=OPEN_TIMEOUT_S))
    await asyncio.wait_for(waiting.receiving.wait(), OPEN_TIMEOUT_S)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    # no_leaks checks that nothing of the connection is left running


async def test_bad_arguments_are_refused() -> None:
    a, _ = signalling_pair()
    with pytest.raises(ValueError, match="TURN"):
        await open_webrtc("host", a, transport=TransportKind.TURN)
    with pytest.raises(ValueError, match="TURN"):
        await open_webrtc("host", a, transport=TransportKind.TURN,
                          ice_servers=[IceServer(("stun:127.0.0.1:3478",))])
    with pytest.raises(ValueError):
        await open_webrtc("host", a, transport=TransportKind.WEBSOCKET_FALLBACK)
    with pytest.raises(ValueError):
        await open_webrtc("guest", a)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await open_webrtc("host", a, timeout_s=0)


def test_ice_server_credentials_stay_out_of_its_repr() -> None:
    server = IceServer(("turn:turn.example:3478",), "user", "s3cret")
    assert server.is_turn
    assert "s3cret" not in repr(server)


async def test_missing_aiortc_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiortc", None)  # makes `import aiortc` fail
    a, _ = signalling_pair()
    with pytest.raises(ImportError, match=re.escape("beach-rescue[webrtc]")):
        await open_webrtc("host", a)


def test_client_modules_import_without_aiortc() -> None:
    code = ("import sys; sys.modules['aiortc'] = None\n"
            "import rescue.client.webrtc, rescue.client.fallback, rescue.client.ladder\n"
            "assert sys.modules['aiortc'] is None\n"
            "assert not [m for m in sys.modules if m.startswith(('aiortc.', 'aioice'))]\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
