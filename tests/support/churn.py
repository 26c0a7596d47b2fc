"""Light protocol sessions that come and go: session churn for chaos and soak tests.

A light session is a host and a participant :class:`~tests.support.chaos_peers.ChaosPeer`
exchanging numbered frames. It joins, lives for its lifetime (in ``live`` meanwhile, so a
chaos loop may abort its peers), then *settles*: both peers must be connected and each
must have received a frame from the other on its current connection, within
``settle_s``. That proves the pair met again after whatever happened to it; then both
leave. :func:`reconnect_tally` sums every peer's reconnects for the run's verdict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.chaos_peers import ChaosPeer
from tests.support.reconnecting import describe

POLL_INTERVAL_S = 0.05


@dataclass
class LightSession:
    """One session's peers and its verdict (None while it runs)."""

    session_id: str
    peers: list[ChaosPeer] = field(default_factory=list)
    outcome: str | None = None  # "ok", or what went wrong

    @property
    def ok(self) -> bool:
        """True when the session started, lived and settled."""
        return self.outcome == "ok"


async def run_light_session(http: aiohttp.ClientSession, relay: Any, session_id: str,
                            lifetime_s: float, *, live: set[ChaosPeer] | None = None,
                            send_interval_s: float = 0.5, give_up_s: float = 15.0,
                            settle_s: float = 20.0,
                            record: list[LightSession] | None = None) -> LightSession:
    """Run one light session to its end and return it with its outcome (never raises for
    what the relay does; the outcome says it)."""
    session = LightSession(session_id)
    if record is not None:
        record.append(session)
    host, part = (ChaosPeer(http, relay, session_id, role, f"{role[0]}-{session_id}",
                            send_interval_s=send_interval_s, give_up_s=give_up_s)
                  for role in ("host", "participant"))
    session.peers = [host, part]
    live = live if live is not None else set()
    try:
        try:
            await host.start()
            await part.start()
        except ConnectionError as e:
            session.outcome = f"start failed: {e}"
            return session
        live.update(session.peers)
        await asyncio.sleep(lifetime_s)  # the session's life: pacing, not synchronisation
        live.difference_update(session.peers)
        session.outcome = await settle(session.peers, settle_s)
        return session
    finally:
        live.difference_update(session.peers)
        await asyncio.gather(*(p.stop() for p in session.peers), return_exceptions=True)


def _settled(peer: ChaosPeer) -> bool:
    return peer.connected and peer.received_since_connect >= 1


async def settle(peers: list[ChaosPeer], within_s: float) -> str:
    """Wait until every peer is connected and hears its counterpart on its current
    connection; "ok", or what is missing after ``within_s`` (or once a peer ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not all(_settled(p) for p in peers):
        ended = [p for p in peers if p.ended is not None]
        if ended or loop.time() >= deadline:
            return (f"not settled after {within_s}s: "
                    f"{[describe(p) for p in peers if not _settled(p)]}")
        await asyncio.sleep(POLL_INTERVAL_S)
    return "ok"


@dataclass
class ReconnectTally:
    """Reconnects of a set of peers: how many losses, how many came back, how fast."""

    losses: int = 0  # judged losses (cut-short ones excluded)
    succeeded: int = 0
    cut_short: int = 0  # lost while the session was being stopped: not judged
    first_try: int = 0  # came back on the first attempt after the loss
    took_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line per failed reconnect

    @property
    def success_rate(self) -> float:
        """Succeeded / losses (1.0 when nothing was lost)."""
        return 1.0 if self.losses == 0 else self.succeeded / self.losses

    def percentile_s(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the reconnect times, 0 without any."""
        if not self.took_s:
            return 0.0
        ordered = sorted(self.took_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reconnect_tally(peers: Iterable[ChaosPeer]) -> ReconnectTally:
    """Sum the reconnect records of ``peers``. A reconnect still unresolved when its peer
    was stopped is *cut short* (not judged) if the stop came within the peer's
    ``give_up_s`` of the loss, and failed otherwise; a peer that ended on its own (a close
    it does not reconnect after) counts as one more loss that did not come back."""
    tally = ReconnectTally()
    for peer in peers:
        for r in peer.reconnects:
            if not r.succeeded and not r.gave_up and peer.stopped_at is not None \
                    and peer.stopped_at - r.lost_at < peer.give_up_s:
                tally.cut_short += 1  # still within its time when the test stopped it
                continue
            tally.losses += 1
            if r.succeeded:
                tally.succeeded += 1
                tally.first_try += not r.failed_attempts
                tally.took_s.append(r.took_s or 0.0)
            else:  # gave up, or still trying long after the loss when stopped
                tally.failures.append(describe(peer))
        if peer.ended is not None and not peer.ended.startswith(("gave up", "stopped")):
            tally.losses += 1
            tally.failures.append(describe(peer))
    return tally
