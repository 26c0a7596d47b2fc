"""A host and a participant meet, exchange frames both ways, in order, byte-exact."""

from __future__ import annotations

import aiohttp

from rescue.frames import Kind
from tests.support.client import join
from tests.support.relay import RelayProcess


async def test_host_and_participant_exchange_frames(relay: RelayProcess,
                                                    http: aiohttp.ClientSession) -> None:
    host = await join(http, relay, "pair-1", "host", "h1")
    part = await join(http, relay, "pair-1", "participant", "p1")
    assert part.server_hello["peers"] == {"host": True, "participants": 0}
    assert await host.recv_event() == {"type": "peer_joined", "role": "participant",
                                       "peer_id": "p1"}
    payloads = [b"x", b"hello" * 100, bytes(range(256)) * 255 + bytes(255)]
    for p in payloads:
        await host.send_frame(p)
    for i, p in enumerate(payloads, start=1):
        frame = await part.recv_frame()
        assert (frame.kind, frame.seq, frame.payload) == (Kind.DATA, i, p)
    await part.send_frame(b"input")
    frame = await host.recv_frame()
    assert frame.payload == b"input"
    await part.close()
    assert await host.recv_event() == {"type": "peer_left", "role": "participant",
                                       "peer_id": "p1", "reason": "closed"}
