"""The periodic sweep of one worker: liveness, data idleness, stuck receivers, grace expiry.

One task per worker instead of timers per connection: every ``heartbeat_s`` it compares
each peer's receive counters with the previous sweep. A peer that sent nothing since
gets a WebSocket ping; after ``missed_heartbeats`` silent sweeps it is closed with
IDLE_TIMEOUT. The same pass closes peers that neither sent nor received a relayed frame
for ``data_idle_timeout_s``, evicts receivers stuck over the high-water mark past the
slow-consumer deadline (when no sender is waiting on them), and drops sessions whose
grace period ended.
"""

from __future__ import annotations

import asyncio
import logging

from rescue.codes import CloseCode
from rescue.logs import log_event
from rescue.server.relay import Relay

log = logging.getLogger("rescue.sweeper")


def sweep_once(relay: Relay, now: float) -> None:
    """Run one sweep over every peer of ``relay`` at loop time ``now``."""
    config = relay.config
    stats = relay.stats
    data_idle = config.data_idle_timeout_s
    for peer in list(relay.peers):
        if peer.closing:
            continue
        if peer.held:
            # The relay itself stopped reading this peer (flow control): not its silence.
            peer.missed = 0
            peer.seen_rx = peer.rx_msgs
            peer.seen_data_at = now
        elif peer.rx_msgs == peer.seen_rx:
            peer.missed += 1
            if peer.missed >= config.missed_heartbeats:
                stats.idle_closes += 1
                log_event(log, "peer.idle_timeout", connection_id=peer.connection_id,
                          missed=peer.missed)
                peer.close(CloseCode.IDLE_TIMEOUT, "timeout")
                continue
            peer.ping()
        else:
            peer.missed = 0
            peer.seen_rx = peer.rx_msgs
        activity = peer.data_msgs + peer.tx_msgs  # frames relayed in either direction
        if activity != peer.seen_data:
            peer.seen_data = activity
            peer.seen_data_at = now
        elif data_idle and now - peer.seen_data_at >= data_idle:
            stats.idle_closes += 1
            log_event(log, "peer.data_idle", connection_id=peer.connection_id)
            peer.close(CloseCode.IDLE_TIMEOUT, "timeout")
            continue
        if peer.conn.writing_paused:
            if peer.paused_since is None:
                peer.paused_since = now
            elif now - peer.paused_since >= config.slow_consumer_timeout_s:
                relay.evict_slow_consumer(peer)
        else:
            peer.paused_since = None
    for session in relay.registry.expire_sessions(now):
        stats.sessions_expired += 1
        if len(stats.session_ages) < 4096:
            stats.session_ages.append(now - session.created_at)
        log_event(log, "session.left", duration_s=round(now - session.created_at, 3))


async def run_sweeper(relay: Relay) -> None:
    """Sweep every ``heartbeat_s`` seconds until cancelled."""
    loop = asyncio.get_running_loop()
    interval = relay.config.heartbeat_s
    while True:
        await asyncio.sleep(interval)
        try:
            sweep_once(relay, loop.time())
        except Exception:
            log.exception("sweeper.failed")
