"""One session's bulk transfer over two SDK channels, with a record of where it ran.

A :class:`SessionTransfer` streams ``down`` bytes host → participant and ``up`` bytes back,
both spread over ``spread_s`` seconds (:class:`~tests.support.sdk_pairs.PacedStream`), so
a disruption at a known point meets both directions in flight however fast the machine
is; both directions are hashed at both ends. Every channel event is kept with the loop
time it happened at and how far each direction had got then, so a test can tell when
each channel connected, with which ``connection_id`` (hence on which node), how many
attempts each reconnect took, and that the streams were still under way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rescue.client.channel import Channel, ChannelEvent, ChannelOptions, Role
from rescue.client.grants import TokenSource
from tests.support.sdk_pairs import PacedStream, PairResult

PSK = b"multi-node resume pre-shared key"


@dataclass(frozen=True)
class SeenEvent:
    """A channel event of one role, and the loop time it was seen at."""

    at: float
    role: str
    name: str
    fields: dict[str, Any]
    down_received: int  # bytes the participant had received host → participant by then
    up_received: int  # bytes the host had received participant → host by then


class SessionTransfer:
    """Host and participant channels of ``session_id`` moving ``down`` and ``up`` bytes.

    ``tokens(role)`` makes each channel's token source; ``relay_url`` is what the channels
    connect to unless a grant names a relay. Each direction is sent at the pace that
    spreads it over ``spread_s`` (it may take longer, never less).
    """

    def __init__(self, session_id: str, relay_url: str | None,
                 tokens: Callable[[str], TokenSource], *, down: int, up: int, seed: int,
                 spread_s: float, options: ChannelOptions) -> None:
        self.session_id = session_id
        self.result = PairResult(session_id, PacedStream(down, seed, down / spread_s),
                                 PacedStream(up, seed + 1, up / spread_s))
        self.events: list[SeenEvent] = []
        self.channels: dict[str, Channel] = {}
        for role in ("host", "participant"):
            channel = Channel(relay_url, session_id, self._role(role), PSK, tokens(role),
                              options=options, on_event=self._recorder(role))
            self.channels[role] = channel
            self.result.channels.append(channel)
        self._tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def _role(role: str) -> Role:
        return "host" if role == "host" else "participant"

    def _recorder(self, role: str) -> Callable[[ChannelEvent], None]:
        def record(event: ChannelEvent) -> None:
            self.events.append(SeenEvent(
                asyncio.get_running_loop().time(), role, event.name, dict(event.fields),
                self.result.down.received_bytes, self.result.up.received_bytes))
        return record

    # --- running ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect both channels (the first connection of each)."""
        await self.channels["host"].start()
        await self.channels["participant"].start()

    def begin(self) -> None:
        """Start streaming both ways (in background tasks)."""
        host, part = self.channels["host"], self.channels["participant"]
        result = self.result
        self._tasks = [asyncio.create_task(coro) for coro in (
            result.down.pump(host), result.down.drain(part),
            result.up.pump(part), result.up.drain(host))]

    async def finish(self) -> PairResult:
        """Wait for both directions to be delivered and acknowledged; never raises (the
        result says what went wrong)."""
        try:
            await asyncio.gather(*self._tasks)
        except Exception as e:  # the outcome is data for the test's verdict
            self.result.error = f"{type(e).__name__}: {e}"
        return self.result

    async def close(self) -> None:
        """Stop streaming and close both channels."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(channel.options.linger_s + 5):
                    await channel.close()

    # --- what happened ---------------------------------------------------------------------------

    def seen(self, role: str, name: str, since: float = float("-inf")) -> list[SeenEvent]:
        """``role``'s events called ``name`` at or after loop time ``since``."""
        return [e for e in self.events if e.role == role and e.name == name and e.at >= since]

    def connection_ids(self, role: str) -> list[str]:
        """The ``connection_id`` of each of ``role``'s connections, in order."""
        return [str(e.fields["connection_id"]) for e in self.seen(role, "connected")]

    def describe(self) -> str:
        """The pair's outcome and each channel's connect/reconnect history, for messages."""
        history = [(round(e.at, 3), e.role[0], e.name,
                    e.fields.get("connection_id") or e.fields.get("cause") or "")
                   for e in self.events if e.name in ("connected", "reconnecting",
                                                      "draining", "failed")]
        return f"{self.result.describe()} history={history}"
