"""One reconnect-storm generator process: host + participant pairs that come back when dropped.

Driven by :mod:`storm_bench` over JSON lines on stdin/stdout:

1. parent -> child: the configuration (:class:`StormConfig`): the sessions of this process.
2. The child connects every session (host, then participant; each peer keeps one token and one
   ``peer_id`` for its whole life) and waits until each session is *paired*: the host received a
   marker frame its participant sent on the participant's current connection after it learned
   (``peer_joined``) that the host is there. Then ``{"event": "ready", ...}``.
3. parent -> child: ``{"cmd": "storm", "kill_ns": ...}`` right after it SIGKILLed a worker. Every
   peer whose connection drops (at any time) reconnects with the same token and ``peer_id``,
   with exponential backoff and full jitter: attempt *k* waits ``uniform(0, min(cap, base *
   2**k))`` (every delay drawn after the kill is reported); an attempt fails on a refusal
   (e.g. HTTP 503), a reset, a close before the ``server_hello`` or a timeout. The child
   reports ``{"event": "storm_done", ...}`` once every dropped session is paired again (or at
   ``storm_timeout_s``).
4. ``{"cmd": "verify"}``: every session pairs once more (all of them, dropped or not);
   ``{"event": "verified", ...}``. ``{"cmd": "close"}`` (or EOF) ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from time import monotonic_ns
from typing import Any

import uvloop
from bench_child import emit, open_stdin, raise_nofile_limit
from bench_tokens import TokenMinter
from ws_client import HEADER, ResponseHead, WsClient, binary_frame, client_hello, upgrade_request

MARK, ACK = b"MK", b"AK"
KIND_DATA = 1
MARK_RESEND_S = 0.5


@dataclass
class StormConfig:
    """The sessions of one process and how its peers reconnect."""

    host: str
    port: int
    proc_index: int
    sessions: list[list[str]]  # [session_id, group] with group "victim" or "bystander"
    token_keys: str
    kid: str
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    connect_timeout_s: float = 10.0
    connect_concurrency: int = 64
    storm_timeout_s: float = 60.0
    max_wall_s: float = 300.0
    seed: int = 0


@dataclass
class Session:
    """A host and a participant, and when they were last paired."""

    sid: str
    group: str
    token: str
    peers: list[Peer] = field(default_factory=list)
    paired_ns: int = 0
    dropped_ns: int = 0

    @property
    def host(self) -> Peer:
        return self.peers[0]

    @property
    def participant(self) -> Peer:
        return self.peers[1]


class Conn(WsClient):
    """One connection attempt of a peer; reports to the peer."""

    def __init__(self, peer: Peer, request: bytes, hello: bytes) -> None:
        super().__init__(request, hello)
        self.peer = peer
        self.ready = False

    def on_refused(self, head: ResponseHead) -> None:
        """An HTTP answer other than 101 (503 overloaded, 503 draining, ...)."""
        self.peer.attempt_failed(self, f"http {head.status} {head.error}".strip())

    def on_text(self, payload: bytes) -> None:
        """The server hello, then events."""
        event = json.loads(payload)
        kind = event.get("type")
        if kind == "server_hello" and not self.ready:
            self.ready = True
            self.peer.joined(self)
        elif kind == "peer_joined" and event.get("role") == "host":
            self.peer.host_present(self)

    def on_binary(self, payload: bytes) -> None:
        """Markers (at the host) and their acks (at the participant)."""
        if len(payload) >= HEADER.size + 6:
            tag = payload[HEADER.size:HEADER.size + 2]
            gen = int.from_bytes(payload[HEADER.size + 2:HEADER.size + 6], "big")
            self.peer.frame(self, tag, gen)

    def on_lost(self, exc: Exception | None) -> None:
        """Before the hello: a failed attempt; after it: a drop."""
        if self.ready:
            self.peer.dropped(self)
        else:
            reason = f"closed {self.close_code}" if self.close_code is not None else (
                type(exc).__name__ if exc else "eof")
            self.peer.attempt_failed(self, f"{reason} before server_hello")


class Peer:
    """A host or participant that keeps its token and peer id and always comes back."""

    def __init__(self, gen: StormGenerator, session: Session, role: str) -> None:
        self.gen = gen
        self.session = session
        self.role = role
        self.peer_id = os.urandom(8).hex()
        self.conn: Conn | None = None
        self.connected = False
        self.generation = 0
        self.attempt = 0
        self.seq = 0
        self.drop_ns = 0
        self.back: list[tuple[int, int]] = []  # (drop_ns, back_ns) per reconnection
        self.marker_acked = True
        self._timer: asyncio.TimerHandle | None = None
        self._mark_timer: asyncio.TimerHandle | None = None

    # --- connecting ----------------------------------------------------------------------
    def start(self) -> None:
        """Open a connection attempt now."""
        self.gen.attempts += 1
        if self.gen.storm_ns:
            self.gen.storm_attempts += 1
        loop = asyncio.get_running_loop()
        sid = self.session.sid
        request = upgrade_request(self.gen.cfg.host, self.gen.cfg.port, sid, self.session.token)
        conn = Conn(self, request, client_hello(sid, self.role, self.peer_id))
        self.conn = conn
        task = loop.create_task(self._connect(conn))
        self.gen.tasks.add(task)
        task.add_done_callback(self.gen.tasks.discard)
        self._timer = loop.call_later(self.gen.cfg.connect_timeout_s, self._timeout, conn, task)

    async def _connect(self, conn: Conn) -> None:
        cfg = self.gen.cfg
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, cfg.host, cfg.port)
        except OSError as e:
            self.attempt_failed(conn, type(e).__name__)

    def _timeout(self, conn: Conn, task: asyncio.Task[None]) -> None:
        if self.conn is conn and not conn.ready:
            task.cancel()
            self.attempt_failed(conn, "timeout")
            conn.abort()

    def _retry_later(self) -> None:
        cfg = self.gen.cfg
        delay = self.gen.rng.uniform(0, min(cfg.backoff_cap_s,
                                            cfg.backoff_base_s * 2 ** self.attempt))
        if self.gen.storm_ns:
            self.gen.backoff_ms.append(round(delay * 1000, 2))
        self.attempt += 1
        asyncio.get_running_loop().call_later(delay, self.start)

    def attempt_failed(self, conn: Conn, reason: str) -> None:
        """Count the failure once and try again after the backoff."""
        if self.conn is not conn:
            return
        self.conn = None
        if self._timer is not None:
            self._timer.cancel()
        self.gen.failures[reason] = self.gen.failures.get(reason, 0) + 1
        if self.gen.storm_ns:
            self.gen.storm_failures[reason] = self.gen.storm_failures.get(reason, 0) + 1
        if not self.gen.closing:
            self._retry_later()

    def joined(self, conn: Conn) -> None:
        """The server hello arrived: connected again."""
        if self.conn is not conn:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.connected = True
        self.generation += 1
        self.attempt = 0
        now = monotonic_ns()
        if self.drop_ns:
            self.back.append((self.drop_ns, now))
            self.drop_ns = 0

    def dropped(self, conn: Conn) -> None:
        """The connection ended after the hello: note it and reconnect (unless closing)."""
        if self.conn is not conn:
            return
        self.conn = None
        self.connected = False
        if self.gen.closing:
            return
        now = monotonic_ns()
        self.drop_ns = now
        self.gen.drops += 1
        self.gen.changed.set()
        session = self.session
        session.paired_ns = 0
        if not session.dropped_ns:
            session.dropped_ns = now
        self._retry_later()

    # --- pairing -------------------------------------------------------------------------
    def host_present(self, conn: Conn) -> None:
        """(participant) The host is in the session: send a marker until it is acked."""
        if self.role == "participant" and conn is self.conn:
            self.marker_acked = False
            self.send_marker()

    def send_marker(self) -> None:
        """(participant) Send a marker for the current connection; resend until acked."""
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        if self.connected and not self.marker_acked and self.conn is not None:
            self._send(MARK, self.generation)
            self._mark_timer = asyncio.get_running_loop().call_later(MARK_RESEND_S,
                                                                     self.send_marker)

    def frame(self, conn: Conn, tag: bytes, generation: int) -> None:
        """A marker reached the host, or an ack reached the participant."""
        session = self.session
        if tag == MARK and self.role == "host":
            other = session.participant
            if generation == other.generation and other.connected and self.connected:
                if not session.paired_ns:
                    session.paired_ns = monotonic_ns()
                    self.gen.paired_changed()
                self._send(ACK, generation)
        elif tag == ACK and self.role == "participant" and generation == self.generation:
            self.marker_acked = True

    def _send(self, tag: bytes, generation: int) -> None:
        if self.conn is not None:
            self.seq += 1
            self.conn.send_raw(binary_frame(KIND_DATA, self.seq,
                                            tag + generation.to_bytes(4, "big")))


class StormGenerator:
    """All sessions of this process."""

    def __init__(self, cfg: StormConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed or os.getpid())
        minter = TokenMinter(cfg.token_keys, cfg.kid)
        self.sessions = []
        for sid, group in cfg.sessions:
            session = Session(sid, group, minter.mint(sid))
            session.peers = [Peer(self, session, "host"), Peer(self, session, "participant")]
            self.sessions.append(session)
        self.failures: dict[str, int] = {}
        self.storm_failures: dict[str, int] = {}
        self.attempts = 0
        self.storm_attempts = 0
        self.backoff_ms: list[float] = []  # every backoff delay drawn during the storm
        self.drops = 0
        self.storm_ns = 0
        self.closing = False
        self._all_paired = asyncio.Event()
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def paired_changed(self) -> None:
        """Wake the waiters: the storm's on every change, the other once all are paired."""
        self.changed.set()
        if all(s.paired_ns for s in self.sessions):
            self._all_paired.set()

    async def wait_all_paired(self, timeout_s: float) -> bool:
        """Wait (bounded) until every session is paired; True if they all are."""
        self._all_paired.clear()
        self.paired_changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_paired.wait(), timeout_s)
        return all(s.paired_ns for s in self.sessions)

    async def connect_all(self) -> None:
        """Start hosts then participants, ``connect_concurrency`` sessions at a time."""
        step = max(1, self.cfg.connect_concurrency)
        for i in range(0, len(self.sessions), step):
            batch = self.sessions[i:i + step]
            for s in batch:
                s.host.start()
            await asyncio.sleep(0.01)
            for s in batch:
                s.participant.start()
            await asyncio.sleep(0.02)

    def repair_all(self) -> None:
        """Forget every pairing and let every participant prove it again."""
        for s in self.sessions:
            s.paired_ns = 0
            p = s.participant
            if p.connected and s.host.connected:
                p.marker_acked = False
                p.send_marker()

    def storm_report(self, kill_ns: int) -> dict[str, Any]:
        """Per-session and per-peer times of the storm, relative to the kill."""
        dropped = [s for s in self.sessions if s.dropped_ns]
        peers = [p for s in self.sessions for p in s.peers]
        return {
            "event": "storm_done", "proc": self.cfg.proc_index,
            "sessions": len(self.sessions),
            "victims": sum(s.group == "victim" for s in self.sessions),
            "victims_dropped": sum(s.group == "victim" for s in dropped),
            "bystanders_dropped": sum(s.group == "bystander" for s in dropped),
            "sessions_dropped": len(dropped),
            "sessions_repaired": sum(1 for s in dropped if s.paired_ns),
            "paired_after_kill_ms": [round((s.paired_ns - kill_ns) / 1e6, 2)
                                     for s in dropped if s.paired_ns],
            "peers_dropped": sum(1 for p in peers if p.back or p.drop_ns),
            "peers_not_back": sum(1 for p in peers if p.drop_ns),
            "back_after_kill_ms": [round((back - kill_ns) / 1e6, 2)
                                   for p in peers for _drop, back in p.back],
            "back_after_drop_ms": [round((back - drop) / 1e6, 2)
                                   for p in peers for drop, back in p.back],
            "drop_after_kill_ms": [round((drop - kill_ns) / 1e6, 2)
                                   for p in peers for drop, _back in p.back],
            "reconnects_per_peer_max": max((len(p.back) for p in peers), default=0),
            "attempts": self.storm_attempts, "drops": self.drops,
            "failed_attempts": dict(self.storm_failures), "backoff_ms": self.backoff_ms,
        }


async def main_async() -> None:
    """Speak the JSON-lines protocol of the module docstring."""
    loop = asyncio.get_running_loop()
    reader = await open_stdin()
    cfg = StormConfig(**json.loads(await reader.readline()))
    loop.call_later(cfg.max_wall_s, os._exit, 3)
    gen = StormGenerator(cfg)
    start = monotonic_ns()
    await gen.connect_all()
    paired = await gen.wait_all_paired(60.0)
    emit({"event": "ready", "proc": cfg.proc_index, "all_paired": paired,
           "sessions_paired": sum(1 for s in gen.sessions if s.paired_ns),
           "connect_s": round((monotonic_ns() - start) / 1e9, 3),
           "failed_attempts": dict(gen.failures)})
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        if command.get("cmd") == "storm":
            gen.storm_ns = kill_ns = int(command["kill_ns"])
            await _wait_storm(gen, cfg.storm_timeout_s)
            emit(gen.storm_report(kill_ns))
        elif command.get("cmd") == "verify":
            gen.repair_all()
            ok = await gen.wait_all_paired(float(command.get("timeout_s", 10.0)))
            emit({"event": "verified", "proc": cfg.proc_index, "all_paired": ok,
                   "sessions_paired": sum(1 for s in gen.sessions if s.paired_ns),
                   "sessions": len(gen.sessions)})
        else:
            break
    gen.closing = True
    for s in gen.sessions:
        for p in s.peers:
            if p.conn is not None:
                p.conn.close()
    await asyncio.sleep(0.5)


async def _wait_storm(gen: StormGenerator, timeout_s: float) -> None:
    """Wait until every victim session dropped and is paired again (bounded)."""
    deadline = monotonic_ns() + int(timeout_s * 1e9)
    victims = [s for s in gen.sessions if s.group == "victim"]
    while True:
        gen.changed.clear()
        settled = all(s.dropped_ns and s.paired_ns for s in victims) and all(
            s.paired_ns for s in gen.sessions if s.dropped_ns)
        left = (deadline - monotonic_ns()) / 1e9
        if settled or left <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gen.changed.wait(), left)


def main() -> None:
    """Entry point of the child process."""
    raise_nofile_limit()
    uvloop.run(main_async())


if __name__ == "__main__":
    main()
