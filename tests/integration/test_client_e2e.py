"""The client SDK through a real relay: pairing, encryption, wrong PSKs, a hostile relay.

Peers are :class:`rescue.client.channel.Channel` objects on aiohttp; the relay is a real
``beach-rescue serve`` process, and the hostile relay is a proxy in front of it
(:mod:`tests.support.tamper`) that flips, drops or replays one frame.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from typing import Any

import pytest

from rescue.client.channel import Channel, ChannelEvent, ChannelOptions, connect
from rescue.client.e2e import Suite
from rescue.client.errors import (
    ChannelError,
    FallbackPaused,
    GapError,
    IntegrityError,
    ReplayError,
    TokenExpired,
    WrongPskError,
)
from rescue.client.grants import StaticToken
from rescue.client.peering import StreamLimits
from tests.support.observe import wait_until
from tests.support.relay import RelayProcess
from tests.support.tamper import TamperingRelay, TamperPlan

PSK = b"correct horse battery staple psk"
WAIT_S = 20.0


def sid() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


def ws_url(relay: RelayProcess) -> str:
    return f"ws://127.0.0.1:{relay.port}/ws"


def channel(relay: RelayProcess | str, session: str, role: str, *, psk: bytes = PSK,
            token: str | None = None, signer: RelayProcess | None = None,
            **options: Any) -> Channel:
    url = relay if isinstance(relay, str) else ws_url(relay)
    minter = signer or relay
    assert isinstance(minter, RelayProcess)
    return connect(url, session_id=session, role=role,  # type: ignore[arg-type]
                   psk=psk, token=token or minter.mint(session),
                   options=ChannelOptions(**options))


async def take(ch: Channel, count: int) -> list[bytes]:
    out = []
    async with asyncio.timeout(WAIT_S):
        for _ in range(count):
            out.append((await ch.receive()).data)
    return out


async def test_host_and_participant_exchange_messages_both_ways(relay: RelayProcess) -> None:
    session = sid()
    events: list[ChannelEvent] = []
    async with channel(relay, session, "host") as host, \
            connect(ws_url(relay), session_id=session, role="participant", psk=PSK,
                    token=relay.mint(session), on_event=events.append) as part:
        down = [os.urandom(n) for n in (1, 100, 65_518, 65_519, 200_000)]  # fragments too
        for data in down:
            await host.send(data)
        assert await take(part, len(down)) == down
        await part.send(b"keystrokes")
        message = await host.receive()
        assert (message.data, message.peer_id) == (b"keystrokes", part.peer_id)
    assert [e.name for e in events][:2] == ["connected", "peer.ready"]


@pytest.mark.parametrize("suite", list(Suite))
async def test_every_suite_carries_data(relay: RelayProcess, suite: Suite) -> None:
    session = sid()
    async with channel(relay, session, "host", suite=suite) as host, \
            channel(relay, session, "participant", suites=frozenset({suite})) as part:
        await host.send(b"down")
        assert await take(part, 1) == [b"down"]


async def test_a_host_broadcasts_to_every_participant_and_hears_each(
        relay: RelayProcess) -> None:
    session = sid()
    async with channel(relay, session, "host") as host:
        parts = [channel(relay, session, "participant") for _ in range(3)]
        for p in parts:
            await p.start()
        try:
            for p in parts:
                await p.wait_ready()
            await host.send(b"to all")
            for p in parts:
                assert await take(p, 1) == [b"to all"]
            for i, p in enumerate(parts):
                await p.send(f"from {i}".encode())
            heard = {}
            async with asyncio.timeout(WAIT_S):
                for _ in parts:
                    m = await host.receive()
                    heard[m.peer_id] = m.data
            assert heard == {p.peer_id: f"from {i}".encode() for i, p in enumerate(parts)}
        finally:
            for p in parts:
                await p.close()


async def test_close_ends_the_other_sides_iteration_after_every_message(
        relay: RelayProcess) -> None:
    session = sid()
    async with channel(relay, session, "participant") as part:
        async with channel(relay, session, "host") as host:
            for i in range(50):
                await host.send(b"line %d\n" % i)
            assert await host.finish("done")  # acknowledged by the participant
        received = [data async for data in part]
    assert received == [b"line %d\n" % i for i in range(50)]


async def test_wrong_psk_fails_both_sides_and_no_data_flows(relay: RelayProcess) -> None:
    session = sid()
    host_events: list[ChannelEvent] = []
    host = connect(ws_url(relay), session_id=session, role="host", psk=PSK,
                   token=relay.mint(session), on_event=host_events.append)
    async with host:
        part = channel(relay, session, "participant", psk=b"another secret of the session")
        await part.start()
        with pytest.raises(WrongPskError, match="wrong PSK"):
            async with asyncio.timeout(WAIT_S):
                await part.wait_ready()
        with pytest.raises(WrongPskError):
            await part.send(b"never sent")
        await part.close()
        assert not host.ready  # nobody holds keys: a host send would wait
        refused = [e for e in host_events if e.name == "peer.refused"]
        assert refused and refused[0].fields["peer"] == part.peer_id


@pytest.mark.parametrize(("attack", "error"), [
    ("flip", IntegrityError), ("drop", GapError), ("replay", ReplayError)])
async def test_a_tampering_relay_is_detected_not_delivered(
        relay: RelayProcess, attack: str, error: type[Exception]) -> None:
    plan = TamperPlan(attack, role="participant", nth=5)  # type: ignore[arg-type]
    proxy = TamperingRelay(relay.port, plan)
    await proxy.start()
    session = sid()
    try:
        async with channel(proxy.url, session, "host", signer=relay, linger_s=0.5) as host:
            part = channel(proxy.url, session, "participant", signer=relay)
            await part.start()
            await part.wait_ready()
            sent = [b"message %d" % i for i in range(10)]
            for data in sent:
                await host.send(data)
            received = []
            with pytest.raises(error):
                async with asyncio.timeout(WAIT_S):
                    while True:
                        received.append((await part.receive()).data)
            assert plan.done.is_set()
            # What arrived before the attack is exactly the sent prefix: nothing altered.
            assert received == sent[:len(received)] and len(received) <= 5
            await part.close()
    finally:
        await proxy.stop()


async def test_a_forged_ack_is_detected_by_the_sender(relay: RelayProcess) -> None:
    plan = TamperPlan("flip-ack", role="host", nth=1)
    proxy = TamperingRelay(relay.port, plan)
    await proxy.start()
    session = sid()
    try:
        async with channel(proxy.url, session, "participant", signer=relay,
                           linger_s=0.5) as part:
            host = channel(proxy.url, session, "host", signer=relay,
                           limits=StreamLimits(ack_every_frames=1), linger_s=0.5)
            await host.start()
            await host.wait_ready()
            await host.send(b"needs an ack")
            with pytest.raises(IntegrityError):
                async with asyncio.timeout(WAIT_S):
                    await host.finish()
            assert isinstance(host.failure, IntegrityError)
            assert plan.done.is_set()
            await host.close()
            del part
    finally:
        await proxy.stop()


async def test_refusals_become_typed_errors(relay_factory: Any) -> None:
    relay = relay_factory(fallback_paused=True)
    session = sid()
    with pytest.raises(FallbackPaused):
        await channel(relay, session, "host").start()
    expired = relay.mint(session, now=1_000_000.0, ttl_s=60)
    ch = connect(ws_url(relay), session_id=session, role="host", psk=PSK,
                 tokens=StaticToken(expired))
    with pytest.raises(FallbackPaused):
        await ch.start()
    await ch.close()


async def test_an_expired_static_token_is_a_typed_error(relay: RelayProcess) -> None:
    session = sid()
    expired = relay.mint(session, now=1_000_000.0, ttl_s=60)
    ch = connect(ws_url(relay), session_id=session, role="host", psk=PSK,
                 tokens=StaticToken(expired))
    with pytest.raises(TokenExpired):
        await ch.start()
    await ch.close()


async def test_a_large_transfer_arrives_intact(relay: RelayProcess) -> None:
    session = sid()
    total = 8 << 20
    async with channel(relay, session, "host") as host, \
            channel(relay, session, "participant") as part:
        sent = hashlib.sha256()

        async def produce() -> None:
            left, n = total, 0
            while left:
                chunk = os.urandom(min(left, 48_000 + (n % 7) * 3000))
                sent.update(chunk)
                await host.send(chunk)
                left -= len(chunk)
                n += 1
            await host.finish()

        producer = asyncio.create_task(produce())
        got = hashlib.sha256()
        size = 0
        async with asyncio.timeout(60):
            async for data in part:
                got.update(data)
                size += len(data)
        await producer
    assert size == total and got.digest() == sent.digest()


async def test_a_participant_that_closes_is_forgotten_by_the_host(
        relay: RelayProcess) -> None:
    session = sid()
    events: list[ChannelEvent] = []
    host = connect(ws_url(relay), session_id=session, role="host", psk=PSK,
                   token=relay.mint(session), on_event=events.append)
    async with host:
        leaving = channel(relay, session, "participant")
        await leaving.start()
        await host.wait_ready()
        assert host.counterparts == [leaving.peer_id]
        await leaving.send(b"bye soon")
        assert (await host.receive()).data == b"bye soon"
        await leaving.close()
        async def left() -> bool:
            return any(e.name == "peer.left" for e in events)

        await wait_until(left, "the host forgets the participant", WAIT_S)
        assert host.counterparts == []
        assert not host.ready


async def test_a_channel_without_a_relay_url_fails_at_start() -> None:
    ch = connect(None, session_id=sid(), role="host", psk=PSK, token="unused")
    with pytest.raises(ChannelError, match="no relay URL"):
        async with asyncio.timeout(WAIT_S):
            await ch.start()
    assert isinstance(ch.failure, ChannelError)
