"""Flow control: a receiver that stops reading is evicted; one that reads slowly only pauses.

The relay never drops a frame: while a receiver is over its high-water mark the sender
is not read (TCP backpressure); a receiver over it for ``slow_consumer_timeout_s`` is
closed with 4005 SLOW_CONSUMER and everyone else goes on, every frame delivered.
The stalled receiver is a :class:`SlowReader`: a raw socket with a small receive buffer
that reads only when the test says so.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp

from rescue.frames import Kind, decode_frame
from tests.support.client import TestPeer, join
from tests.support.observe import admin_stats, find_log, free_port, wait_for_log, wait_until
from tests.support.slow_reader import OP_BINARY, OP_TEXT, SlowReader

ADMIN_KEY = "flow-admin-key"
FRAME_PAYLOAD = 4096
FLOW_SETTINGS: dict[str, Any] = {
    "workers": 1,  # /debug/stats then describes the worker that holds the session
    "write_high_water_bytes": 65536,
    "write_low_water_bytes": 16384,
    "heartbeat_s": 5.0,
    "close_timeout_s": 2.0,
    "log_level": "debug",
    # The host streams as fast as it can; rate limits are not under test here.
    "rate_messages_per_s": 1e9,
    "rate_messages_burst": 10**9,
    "rate_bytes_per_s": 1e12,
    "rate_bytes_burst": 10**12,
}


def payload_for(seq: int) -> bytes:
    """A 4 KiB payload that names its seq, so a frame in the wrong place is caught."""
    return seq.to_bytes(4, "big") * (FRAME_PAYLOAD // 4)


class Collector:
    """Reads a peer's frames and events in the background until a CONTROL marker frame."""

    def __init__(self, peer: TestPeer) -> None:
        self.peer = peer
        self.seqs: list[int] = []
        self.bad: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.marker = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.peer.ws.receive(timeout=30)
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))
                continue
            assert msg.type is aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
            frame = decode_frame(msg.data)
            if frame.kind is Kind.CONTROL:
                self.marker.set()
                return
            self.seqs.append(frame.seq)
            if frame.payload != payload_for(frame.seq):
                self.bad.append(frame.seq)


async def test_stalled_receiver_is_evicted_others_get_every_frame(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay = relay_factory(slow_consumer_timeout_s=1.5, admin_port=free_port(),
                          admin_key=ADMIN_KEY, **FLOW_SETTINGS)
    sid = f"flow-{uuid.uuid4().hex[:8]}"
    host = await join(http, relay, sid, "host", "host")
    stalled = await SlowReader.join(relay, sid, "participant", "stalled")
    b = await join(http, relay, sid, "participant", "b")
    stalled_id = stalled.server_hello["connection_id"]
    host_events: list[dict[str, Any]] = []
    evicted = asyncio.Event()

    async def host_reader() -> None:
        # Keeps a receive pending (so pings are answered) and watches for the eviction.
        while True:
            msg = await host.ws.receive(timeout=30)
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                host_events.append(event)
                if event.get("type") == "peer_left" and event["peer_id"] == "stalled":
                    evicted.set()
            elif msg.type is aiohttp.WSMsgType.BINARY:
                assert decode_frame(msg.data).payload == b"from b"
                return
            else:
                raise AssertionError(f"host lost its connection: {msg.type!r} {msg.extra!r}")

    reader = asyncio.get_running_loop().create_task(host_reader())
    collector = Collector(b)
    sent = 0
    async with asyncio.timeout(20):
        while not evicted.is_set():
            sent = await host.send_frame(payload_for(host.seq + 1))
            await asyncio.sleep(0)  # let the readers run between sends
        for _ in range(20):  # the stream goes on after the eviction
            sent = await host.send_frame(payload_for(host.seq + 1))
        await host.send_frame(b"end", Kind.CONTROL)
        await collector.marker.wait()
    await collector.task

    # B got every frame, in order, intact.
    assert collector.seqs == list(range(1, sent + 1))
    assert collector.bad == []
    # The stalled receiver was evicted as a slow consumer, and only it.
    await wait_for_log(relay, "peer.evicted", connection_id=stalled_id)
    records = find_log(relay, "peer.evicted")
    assert [r["connection_id"] for r in records] == [stalled_id]
    assert {"type": "peer_left", "role": "participant", "peer_id": "stalled",
            "reason": "evicted"} in host_events
    assert not any(e["type"] == "peer_left" and e["peer_id"] == "b" for e in host_events)
    # What the stalled peer had been sent is an in-order prefix, then the close frame.
    messages, close = await stalled.read_until_close()
    stalled.close()
    assert close == (4005, "SLOW_CONSUMER")
    frames = [decode_frame(payload) for opcode, payload in messages if opcode == OP_BINARY]
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
    assert 0 < len(frames) < sent
    assert all(opcode in (OP_BINARY, OP_TEXT) for opcode, _ in messages)
    # The host was never disconnected: it still talks with B.
    await b.send_frame(b"from b")
    await reader
    stats = await admin_stats(http, relay, ADMIN_KEY)
    assert stats["counters"]["slow_consumer_evictions"] == 1
    assert stats["counters"]["closes"].get("SLOW_CONSUMER") == 1
    assert stats["peers"] == 2
    await b.close()
    await host.close()


async def test_slow_receiver_within_the_deadline_gets_every_frame(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    slow_consumer_timeout_s = 8.0
    relay = relay_factory(slow_consumer_timeout_s=slow_consumer_timeout_s,
                          admin_port=free_port(), admin_key=ADMIN_KEY, **FLOW_SETTINGS)
    sid = f"flow-{uuid.uuid4().hex[:8]}"
    host = await join(http, relay, sid, "host", "host")
    slow = await SlowReader.join(relay, sid, "participant", "slow")
    assert await host.recv_event() == {"type": "peer_joined", "role": "participant",
                                       "peer_id": "slow"}
    enough = asyncio.Event()

    async def stream() -> None:
        # Streams until the relay has paused the host at least once (kernel socket buffers
        # take megabytes before the relay's own high-water mark is reached).
        while not enough.is_set():
            await host.send_frame(payload_for(host.seq + 1))
            await asyncio.sleep(0)
        await host.send_frame(b"end", Kind.CONTROL)

    async def paused() -> bool:
        stats = await admin_stats(http, relay, ADMIN_KEY)
        return bool(stats["counters"]["flow_pauses"] > 0)

    sender = asyncio.get_running_loop().create_task(stream())
    try:
        await wait_until(paused, "the relay to pause the host")
        enough.set()
        seqs: list[int] = []
        # Once the receiver reads, the host must be released as soon as the receiver is under
        # its low-water mark: a few megabytes take well under the slow-consumer deadline.
        async with asyncio.timeout(slow_consumer_timeout_s / 2):
            while True:
                opcode, data = await slow.read_message()
                if opcode != OP_BINARY:
                    continue
                frame = decode_frame(data)
                if frame.kind is Kind.CONTROL:
                    break
                assert frame.payload == payload_for(frame.seq)
                seqs.append(frame.seq)
            await sender
        assert seqs == list(range(1, host.seq))  # every data frame; the marker was the last seq
        stats = await admin_stats(http, relay, ADMIN_KEY)
        assert stats["counters"]["flow_pauses"] > 0
        assert stats["counters"]["slow_consumer_evictions"] == 0
        assert "SLOW_CONSUMER" not in stats["counters"]["closes"]
        assert stats["peers"] == 2
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        slow.close()
        await host.close()


async def test_a_sender_held_back_by_flow_control_is_not_closed_as_idle(
        relay_factory: Any, http: aiohttp.ClientSession) -> None:
    # Liveness is faster than the slow-consumer deadline: the stalled receiver (which
    # answers no pings either) is closed first, and the host must then simply go on.
    relay = relay_factory(**dict(FLOW_SETTINGS, heartbeat_s=0.5, missed_heartbeats=3,
                                 slow_consumer_timeout_s=3.0))
    sid = f"flow-{uuid.uuid4().hex[:8]}"
    host = await join(http, relay, sid, "host", "host")
    stalled = await SlowReader.join(relay, sid, "participant", "stalled")
    b = await join(http, relay, sid, "participant", "b")
    stalled_gone = asyncio.Event()
    host_closed: list[Any] = []

    async def host_reader() -> None:
        while True:
            msg = await host.ws.receive(timeout=30)
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                if event["type"] == "peer_left" and event["peer_id"] == "stalled":
                    stalled_gone.set()
            elif msg.type is aiohttp.WSMsgType.BINARY:
                return  # B's final frame
            else:
                host_closed.append((msg.type, msg.data, msg.extra))
                stalled_gone.set()
                return

    reader = asyncio.get_running_loop().create_task(host_reader())
    collector = Collector(b)
    try:
        async with asyncio.timeout(20):
            while not stalled_gone.is_set():
                await host.send_frame(payload_for(host.seq + 1))
                await asyncio.sleep(0)
            assert host_closed == [], "the host was disconnected"
            for _ in range(20):
                await host.send_frame(payload_for(host.seq + 1))
            await host.send_frame(b"end", Kind.CONTROL)
            await collector.marker.wait()
        assert collector.seqs == list(range(1, host.seq))
        await b.send_frame(b"from b")
        await reader
        assert host_closed == []
    finally:
        stalled.close()
        collector.task.cancel()
        reader.cancel()
        await asyncio.gather(collector.task, reader, return_exceptions=True)
        await b.close()
        await host.close()
