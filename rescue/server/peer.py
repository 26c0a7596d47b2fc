"""One joined WebSocket connection as the relay sees it: writes, drain waits, close.

A :class:`Peer` is a session member on a :class:`~rescue.server.connection.WsConnection`.
Forwarded frames are written straight to the transport (see :mod:`rescue.wsframe`); the
transport's write-buffer limits are set to the relay's high/low water marks so the
connection's ``writing_paused`` tells whether senders must wait for this peer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rescue import tracing
from rescue.codes import CloseCode
from rescue.ratelimit import ConnectionRateLimit
from rescue.sessions import Member, Role, Session
from rescue.wsframe import OP_PING, OP_PONG, binary_frame, control_frame, text_frame

if TYPE_CHECKING:
    from rescue.server.connection import WsConnection
    from rescue.server.relay import Relay


class Peer:
    """A connection that completed its hello and is a member of a session."""

    # One per connection: slots only, and nothing the other attributes already reach
    # (a cached bound method would cost 64 bytes per connection).
    __slots__ = (
        "_close_task", "close_code", "closing", "conn", "connection_id",
        "data_msgs", "held", "is_host", "member", "missed", "paused_since", "peer_id",
        "rate", "relay", "role", "rx_bytes", "rx_msgs", "seen_data",
        "seen_data_at", "seen_rx", "session", "telemetry", "trace", "transport",
        "tx_bytes", "tx_msgs",
    )

    def __init__(self, relay: Relay, conn: WsConnection, *, role: Role, peer_id: str,
                 connection_id: str, session: Session[Peer], rate: ConnectionRateLimit,
                 now: float, telemetry: bool = False,
                 trace: tracing.OpenSpan = tracing.NOOP_SPAN) -> None:
        self.relay = relay
        self.conn = conn
        self.transport = transport = conn.transport
        self.trace = trace  # the connection's span, ended when it closes
        self.role = role
        self.is_host = role == "host"
        self.peer_id = peer_id
        self.connection_id = connection_id
        self.telemetry = telemetry  # the user opted in to non-essential per-peer data
        self.session = session
        self.member: Member[Peer] | None = None
        self.rate = rate
        self.closing = False
        self.close_code: CloseCode | None = None
        self.rx_msgs = self.rx_bytes = self.tx_msgs = self.tx_bytes = self.data_msgs = 0
        self.seen_rx = self.seen_data = self.missed = 0
        self.seen_data_at = now
        self.paused_since: float | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.held = False  # the relay stopped reading this peer (its receivers are full)
        high = relay.config.write_high_water_bytes
        transport.set_write_buffer_limits(high=high, low=relay.config.write_low_water_bytes)

    # --- writing ---------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Write unless the peer is closing or its connection is already gone.

        The client may vanish before this peer's own task has noticed (and closed it);
        uvloop refuses writes to such a transport, so they are skipped here.
        """
        if not self.closing and not self.transport.is_closing():
            self.transport.write(data)

    def echo_heartbeat(self, data: bytes) -> None:
        """Answer a heartbeat frame to its sender (not counted as relayed traffic)."""
        self._write(binary_frame(data))

    def write_text(self, text: str) -> None:
        """Queue one text message (an event) unless the peer is closing."""
        self._write(text_frame(text))

    def ping(self) -> None:
        """Send a WebSocket ping (liveness probe of a silent peer)."""
        self._write(control_frame(OP_PING))

    def pong(self, payload: bytes) -> None:
        """Answer a client's ping."""
        self._write(control_frame(OP_PONG, payload[:125]))

    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    async def wait_writable(self, deadline_s: float) -> bool:
        """Wait until this peer's buffer is under the low-water mark, or it closes.

        Returns False if it stayed over the high-water mark until its slow-consumer
        deadline (measured from when it was first seen paused); the caller evicts it.
        """
        now = asyncio.get_running_loop().time()
        if self.paused_since is None:
            self.paused_since = now
        remaining = self.paused_since + deadline_s - now
        if remaining > 0:
            await self.conn.wait_writable(remaining)
        if self.closing:
            return True  # closed meanwhile; whoever closed it counted why
        if self.conn.writing_paused:
            return False
        self.paused_since = None
        return True

    # --- closing ---------------------------------------------------------------------
    def close(self, code: CloseCode, left_reason: str) -> None:
        """Leave the session now and close the WebSocket with ``code`` in the background.

        Idempotent. Counterparts get ``peer_left`` with ``left_reason``; the close is
        counted (by reason) in the worker's stats and logged.
        """
        if self.closing:
            return
        self.relay.detach(self, left_reason)
        self.closing = True
        self.close_code = code
        self.relay.stats.closes[code.name] += 1
        self.relay.ended(self)
        # The close frame goes out now (waking senders waiting for this peer to drain),
        # and from now on the connection hands on nothing more: messages already buffered
        # behind the one that closed it are dropped, as RFC 6455 wants after a close frame,
        # instead of reaching the peer's counterparts.
        self.conn.send_close(code)
        self._close_task = self.relay.spawn(
            self.conn.close(code, self.relay.config.close_timeout_s))

    async def wait_closed(self) -> None:
        """Wait for the close started by :meth:`close`."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)
