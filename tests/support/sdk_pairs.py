"""SDK channel pairs that stream both ways at a steady pace and prove nothing was lost.

A pair is a host and a participant :class:`~tests.support.chaos_peers.AbortableChannel`
of one session, each getting its token from the relay's control plane
(``/v1/fallback/token``, the production path). The host streams ``down`` bytes, the
participant ``up`` bytes, both paced over the pair's lifetime so that every fault of a
run meets streams in flight; each direction is SHA-256 hashed as sent and as received.
Zero bytes lost means: every byte arrived, in order (equal digests), and each sender's
close was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from rescue.client.backoff import BackoffPolicy
from rescue.client.channel import Channel, ChannelOptions
from rescue.client.grants import ControlPlaneTokens

PSK = b"chaos and soak pre-shared secret"
CHUNK_BYTES = (1, 48_000)
PAIR_MARGIN_S = 90.0  # beyond its lifetime, how long a pair may take to finish
OPTIONS = ChannelOptions(
    backoff=BackoffPolicy(base_s=0.1, cap_s=2.0, give_up_after_s=60.0), linger_s=15.0)


class PacedStream:
    """One direction: seeded pseudo-random chunks sent at ``rate`` bytes/s, hashed at both
    ends."""

    def __init__(self, total: int, seed: int, rate: float) -> None:
        self.total = total
        self.seed = seed
        self.rate = rate
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.acknowledged = False  # the sender's finish() saw every frame acknowledged

    def chunks(self) -> Iterator[bytes]:
        """The chunks in order (the same for the same seed), made as they are sent."""
        rng = random.Random(self.seed)
        left = self.total
        while left:
            size = min(left, rng.randint(*CHUNK_BYTES))
            yield rng.randbytes(size)
            left -= size

    async def pump(self, sender: Channel) -> None:
        """Send every chunk on schedule, then finish the stream (waits for the acks)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        for chunk in self.chunks():
            due = started + self.sent_bytes / self.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())  # pacing the load, not synchronising
            self.sent.update(chunk)
            await sender.send(chunk)
            self.sent_bytes += len(chunk)
        self.acknowledged = await sender.finish("all sent")

    async def drain(self, receiver: Channel) -> None:
        """Receive until ``total`` bytes arrived (or the stream ended early)."""
        async for data in receiver:
            self.received.update(data)
            self.received_bytes += len(data)
            if self.received_bytes >= self.total:
                return

    @property
    def intact(self) -> bool:
        """Every byte arrived, in order, and the sender's end was acknowledged."""
        return (self.received_bytes == self.sent_bytes == self.total and self.acknowledged
                and self.received.digest() == self.sent.digest())


@dataclass
class PairResult:
    """What one pair did and how it ended."""

    session_id: str
    down: PacedStream
    up: PacedStream
    started_at: float = 0.0  # loop time the pair asked for its first token
    channels: list[Channel] = field(default_factory=list)
    error: str | None = None  # an exception that stopped the pair, if any
    states: list[str] = field(default_factory=list)  # each channel's state as it ended

    @property
    def intact(self) -> bool:
        """Both directions intact, no channel failed, nothing raised."""
        return (self.error is None and self.down.intact and self.up.intact
                and all(c.failure is None for c in self.channels))

    @property
    def connections(self) -> int:
        """Successful connections of both channels (2 without any reconnect)."""
        return sum(c.connections for c in self.channels)

    def describe(self) -> str:
        """A one-line account for assertion messages."""
        failures = [repr(c.failure) for c in self.channels if c.failure is not None]
        return (f"{self.session_id}: down sent {self.down.sent_bytes} received "
                f"{self.down.received_bytes}/{self.down.total} acked={self.down.acknowledged} "
                f"up sent {self.up.sent_bytes} received {self.up.received_bytes}/"
                f"{self.up.total} acked={self.up.acknowledged} failures={failures} "
                f"error={self.error} at exit: {'; '.join(self.states)}")


def channel_state(channel: Channel) -> str:
    """What a channel was doing, for a report on a pair that did not end well."""
    return (f"{channel.role} connected={channel.connected} ready={channel.ready} "
            f"connections={channel.connections} counterparts={channel.counterparts} "
            f"unacked={channel._engine.unacked} ended={channel._engine.ended!r}")


async def run_pair(channel_type: type[Channel], control_plane_url: str, service_key: str,
                   session_id: str, *, down: int, up: int, lifetime_s: float, seed: int,
                   live: set[Channel] | None = None,
                   margin_s: float = PAIR_MARGIN_S) -> PairResult:
    """Stream ``down`` bytes host → participant and ``up`` back over about ``lifetime_s``
    (giving up ``margin_s`` after it); never raises (the result says what went wrong).
    While streaming, both channels are in ``live`` (so a chaos loop can abort them)."""
    spread = max(lifetime_s * 0.8, 1.0)
    result = PairResult(session_id, PacedStream(down, seed, down / spread),
                        PacedStream(up, seed + 1, up / spread),
                        started_at=asyncio.get_running_loop().time())

    def channel(role: str) -> Channel:
        tokens = ControlPlaneTokens(control_plane_url, service_key, session_id)
        options = dataclasses.replace(OPTIONS, peer_id=f"{role[0]}-{session_id}")
        made = channel_type(None, session_id, role, PSK, tokens,  # type: ignore[arg-type]
                            options=options)
        result.channels.append(made)
        return made

    host, part = channel("host"), channel("participant")
    live = live if live is not None else set()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(lifetime_s + margin_s):
            await host.start()
            await part.start()
            live.update((host, part))
            tasks = [asyncio.create_task(coro) for coro in (
                result.down.pump(host), result.down.drain(part),
                result.up.pump(part), result.up.drain(host))]
            await asyncio.gather(*tasks)
    except Exception as e:  # the pair's outcome is data for the test's verdict
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.states = [channel_state(c) for c in (host, part)]
        live.discard(host)
        live.discard(part)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in (part, host):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(OPTIONS.linger_s + 5):
                    await ch.close()
    return result
