"""Resume without loss: a long transfer survives worker kills and a reload.

The issue's bar: 50 MiB streamed host → participant and 5 MiB back through a real
two-worker node, while the worker that owns the session is SIGKILLed twice and the
supervisor is SIGHUPed once. Both directions must arrive byte for byte, in order (SHA-256
over the concatenation), and every channel must have reconnected through each disruption.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

from rescue.client.channel import Channel, ChannelOptions, connect
from rescue.client.peering import StreamLimits
from rescue.ring import Ring
from tests.support.observe import wait_until
from tests.support.processes import wait_for_workers
from tests.support.relay import RelayProcess

PSK = b"resume test pre-shared secret 32"
FAST: dict[str, Any] = {
    "heartbeat_s": 5.0,
    "close_timeout_s": 1.0,
    "drain_timeout_s": 10.0,
    "drain_window_s": 1.0,
    "drain_reconnect_spread_ms": 200,
}
DOWN = 50 << 20
UP = 5 << 20
TRANSFER_TIMEOUT_S = 240.0


def session_on_slot(slot: int, slots: int) -> str:
    ring = Ring(range(slots))
    while True:
        sid = f"resume-{uuid.uuid4().hex[:10]}"
        if ring.owner(sid) == slot:
            return sid


class Stream:
    """One direction: a deterministic pseudo-random byte stream, hashed on both ends."""

    def __init__(self, total: int, seed: bytes) -> None:
        self.total = total
        self.seed = seed
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0

    def chunks(self) -> list[bytes]:
        out, n, left = [], 0, self.total
        block = hashlib.sha256(self.seed).digest() * 4096  # 128 KiB of pattern
        while left:
            size = min(left, 30_000 + (n * 7919) % 40_000)
            chunk = bytes([n % 251]) + block[: size - 1]
            out.append(chunk)
            left -= size
            n += 1
        return out

    async def pump(self, sender: Channel) -> None:
        for chunk in self.chunks():
            self.sent.update(chunk)
            await sender.send(chunk)
            self.sent_bytes += len(chunk)
        assert await sender.finish("all sent"), "the stream's end was never acknowledged"

    async def drain(self, receiver: Channel) -> None:
        async for data in receiver:
            self.received.update(data)
            self.received_bytes += len(data)
            if self.received_bytes >= self.total:
                return


async def until(predicate: Callable[[], bool], what: str, within_s: float = 60.0) -> None:
    """Poll ``predicate`` (a counter of the transfer or the channels) until it holds."""

    async def check() -> bool:
        return predicate()

    await wait_until(check, what, within_s)


async def test_fifty_mib_survive_two_worker_kills_and_a_reload(relay_factory: Any) -> None:
    relay: RelayProcess = relay_factory(workers=2, **FAST)
    workers = await wait_for_workers(relay, 2, generation=1)
    session = session_on_slot(0, 2)
    url = f"ws://127.0.0.1:{relay.port}/ws"
    options = ChannelOptions(limits=StreamLimits(max_unacked_bytes=2 << 20), linger_s=30.0)

    def open_channel(role: str) -> Channel:
        return connect(url, session_id=session, role=role,  # type: ignore[arg-type]
                       psk=PSK, token=relay.mint(session), options=options)

    down, up = Stream(DOWN, b"down"), Stream(UP, b"up")
    async with open_channel("host") as host, open_channel("participant") as part:
        tasks = [asyncio.create_task(coro) for coro in (
            down.pump(host), down.drain(part), up.pump(part), up.drain(host))]
        try:
            async with asyncio.timeout(TRANSFER_TIMEOUT_S):
                for mark in (DOWN // 5, 2 * DOWN // 5):
                    await until(lambda mark=mark: down.received_bytes >= mark, "progress")
                    before = (host.connections, part.connections)
                    os.kill(workers[0], signal.SIGKILL)
                    await until(lambda b=before: host.connections > b[0]
                                and part.connections > b[1], "both back after the kill")
                    workers = await wait_for_workers(relay, 2, generation=1)
                await until(lambda: down.received_bytes >= 3 * DOWN // 5, "progress")
                before = (host.connections, part.connections)
                relay.proc.send_signal(signal.SIGHUP)
                await until(lambda b=before: host.connections > b[0]
                            and part.connections > b[1], "both back after the reload")
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    assert (down.received_bytes, up.received_bytes) == (DOWN, UP)
    assert down.received.digest() == down.sent.digest()
    assert up.received.digest() == up.sent.digest()
    assert host.failure is None and part.failure is None
    assert host.connections >= 4 and part.connections >= 4, \
        (host.connections, part.connections)
    started = relay.events("drain.started")
    assert started and max(e["peers"] for e in started) >= 1, "the reload drained nobody"
    assert relay.events("reload.completed")
