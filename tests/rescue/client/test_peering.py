"""Tests for rescue.client.peering: host and participant engines talking through a fake relay
(:class:`Relay`, the routing rules of docs/protocol.md section 5) with a fake clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.client.e2e import SUITES_ALL, Suite
from rescue.client.errors import (
    ChannelError,
    GapError,
    IntegrityError,
    NegotiationError,
    ReplayError,
    WrongPskError,
)
from rescue.client.peering import HostEngine, ParticipantEngine, StreamLimits
from rescue.frames import Frame, Kind, decode_frame

SESSION = "sess-peering"
PSK = b"0123456789abcdef-session-secret"
LIMITS = StreamLimits()
Engine = HostEngine | ParticipantEngine
Event = tuple[str, str, str, str]  # ("joined" or "left", role, peer_id, reason)
#: Called for every frame routed from ``sender`` to ``receiver``: the bytes to deliver, or None
#: to drop the frame (the relay misbehaving).
Tamper = Callable[[str, str, bytes], bytes | None]


@dataclass
class Peer:
    """One peer as the relay sees it: its engine, whether it is connected, and what it got."""

    engine: Engine
    online: bool = False
    connection: int = 0  # bumped on every (re)connect: frames queued for an older one are lost
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def role(self) -> str:
        """``host`` or ``participant``."""
        return "host" if isinstance(self.engine, HostEngine) else "participant"


@dataclass
class Relay:
    """An in-memory relay: host frames go to every connected participant, a participant's to
    the host; nothing is stored for absent receivers; events as in protocol.md section 5.

    Frames and events wait in one FIFO queue (so order per direction holds) and are delivered
    by :meth:`step`/:meth:`run`; after every input to an engine its output is routed at once.
    """

    now: float = 0.0
    tamper: Tamper | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    queue: deque[tuple[str, int, Frame | Event]] = field(default_factory=deque)
    log: list[tuple[str, str, Frame]] = field(default_factory=list)  # (sender, receiver, frame)

    def counterparts(self, peer: Peer) -> list[Peer]:
        """The connected peers that exchange frames with ``peer``."""
        return [q for q in self.peers.values() if q.online and q.role != peer.role]

    def connect(self, engine: Engine) -> None:
        """A (re)connection of ``engine``'s peer id; a connected namesake is replaced."""
        pid = engine.peer_id
        if pid in self.peers and self.peers[pid].online:
            self.disconnect(pid, "replaced")
        peer = self.peers.setdefault(pid, Peer(engine))
        peer.engine, peer.online = engine, True
        peer.connection += 1
        engine.connected(self.now)
        others = self.counterparts(peer)
        self.queue.extend((pid, peer.connection, ("joined", o.role, o.engine.peer_id, ""))
                          for o in others)
        self.queue.extend((o.engine.peer_id, o.connection, ("joined", peer.role, pid, ""))
                          for o in others)
        self.flush(peer)

    def disconnect(self, pid: str, reason: str = "closed") -> None:
        """The peer's connection ends: what it writes now is lost; counterparts hear of it."""
        peer = self.peers[pid]
        self.flush(peer)
        peer.online = False
        self.queue.extend((o.engine.peer_id, o.connection, ("left", peer.role, pid, reason))
                          for o in self.counterparts(peer))

    def flush(self, peer: Peer) -> None:
        """Drain the engine's output and messages; route frames (or drop them if offline)."""
        peer.messages.extend((m.peer_id, m.data) for m in peer.engine.messages_received())
        frames = peer.engine.data_to_send()
        if not peer.online:
            return
        for raw in frames:
            for other in self.counterparts(peer):
                tampered = raw if self.tamper is None else self.tamper(
                    peer.engine.peer_id, other.engine.peer_id, raw)
                if tampered is None:
                    continue
                frame = decode_frame(tampered)
                if frame.kind is not Kind.HEARTBEAT:
                    self.log.append((peer.engine.peer_id, other.engine.peer_id, frame))
                    self.queue.append((other.engine.peer_id, other.connection, frame))

    def inject(self, pid: str, frame: Frame) -> None:
        """Queue a frame of the relay's own choosing for ``pid`` (a replay, a forgery)."""
        self.queue.append((pid, self.peers[pid].connection, frame))

    def step(self) -> None:
        """Deliver the oldest queued frame or event (dropped if its connection is gone)."""
        pid, connection, item = self.queue.popleft()
        peer = self.peers[pid]
        if not peer.online or peer.connection != connection:
            return
        try:
            if isinstance(item, Frame):
                peer.engine.on_frame(item, self.now)
            elif item[0] == "joined":
                peer.engine.peer_joined(item[1], item[2], self.now)
            else:
                peer.engine.peer_left(item[1], item[2], item[3], self.now)
        finally:
            self.flush(peer)

    def run(self) -> None:
        """Deliver until nothing is queued."""
        for _ in range(100_000):
            if not self.queue:
                return
            self.step()
        raise AssertionError("the engines never go quiet")

    def advance(self, dt: float) -> None:
        """Move the clock and tick every connected engine."""
        self.now += dt
        for peer in list(self.peers.values()):
            if peer.online:
                peer.engine.tick(self.now)
                self.flush(peer)

    def settle(self) -> None:
        """Run, then let ack timers fire until nothing more happens."""
        for _ in range(5):
            self.run()
            self.advance(LIMITS.ack_delay_s + 0.01)
        self.run()

    def send(self, pid: str, data: bytes) -> None:
        """The application at ``pid`` sends one message (it must fit the buffer now)."""
        peer = self.peers[pid]
        assert peer.engine.can_send(len(data))
        peer.engine.send_message(data)
        self.flush(peer)

    def close(self, pid: str, reason: str) -> None:
        """The application at ``pid`` ends its stream (a close frame)."""
        self.peers[pid].engine.send_close(reason)
        self.flush(self.peers[pid])

    def take(self, pid: str) -> list[tuple[str, bytes]]:
        """``(sender peer_id, data)`` of the messages ``pid`` received since the last take."""
        got, self.peers[pid].messages = self.peers[pid].messages, []
        return got

    def frames(self, sender: str, receiver: str, kind: Kind) -> list[Frame]:
        """Frames of ``kind`` routed from ``sender`` to ``receiver`` so far."""
        return [f for s, r, f in self.log if s == sender and r == receiver and f.kind is kind]


def make_host(suite: Suite = Suite.AES_256_GCM, peer_id: str = "h-1") -> HostEngine:
    """A host engine of the test session."""
    return HostEngine(SESSION, peer_id, PSK, suite, LIMITS)


def make_participant(peer_id: str, limits: StreamLimits = LIMITS, psk: bytes = PSK,
                     suites: frozenset[Suite] = SUITES_ALL) -> ParticipantEngine:
    """A participant engine of the test session."""
    return ParticipantEngine(SESSION, peer_id, psk, suites, limits)


def keyed(count: int = 1, suite: Suite = Suite.AES_256_GCM, limits: StreamLimits = LIMITS,
          ) -> tuple[Relay, HostEngine, list[ParticipantEngine]]:
    """A relay with a connected host and ``count`` participants ``p-0``... holding keys."""
    relay, host = Relay(), HostEngine(SESSION, "h-1", PSK, suite, limits)
    relay.connect(host)
    parts = []
    for i in range(count):
        part = make_participant(f"p-{i}", limits)
        relay.connect(part)
        relay.run()
        assert part.ready
        parts.append(part)
    assert host.participants == [p.peer_id for p in parts]
    return relay, host, parts


def what(engine: Engine) -> list[tuple[str, str]]:
    """``(peer_id, what)`` of the engine's notices so far."""
    return [(n.peer_id, n.what) for n in engine.notices]


# --- handshake and messages --------------------------------------------------------------------

@pytest.mark.parametrize("suite", list(Suite))
def test_handshake_then_a_message_each_way(suite: Suite) -> None:
    relay, host, (part,) = keyed(suite=suite)
    assert what(host) == [("p-0", "ready")] and what(part) == [("h-1", "ready")]
    assert part.link is not None and part.link.slot == 0
    relay.send("h-1", b"hello participant")
    relay.send("p-0", b"hello host")
    relay.run()
    assert relay.take("p-0") == [("h-1", b"hello participant")]
    assert relay.take("h-1") == [("p-0", b"hello host")]
    relay.settle()
    assert host.unacked == 0 and part.unacked == 0


def test_a_participant_without_the_hosts_suite_is_refused() -> None:
    relay, host = Relay(), make_host(Suite.CHACHA20_POLY1305)
    relay.connect(host)
    relay.connect(make_participant("p-0", suites=frozenset({Suite.AES_256_GCM})))
    with pytest.raises(NegotiationError):
        relay.run()
    assert host.notices[-1].what == "refused" and host.participants == []


def test_a_200_kb_message_is_fragmented_and_reassembled_both_ways() -> None:
    relay, _, _ = keyed()
    big = bytes(range(256)) * 800  # 204,800 bytes
    relay.send("h-1", big)
    relay.send("p-0", big[::-1])
    relay.run()
    assert relay.take("p-0") == [("h-1", big)]
    assert relay.take("h-1") == [("p-0", big[::-1])]
    assert len(relay.frames("h-1", "p-0", Kind.DATA)) == 4  # chunks of 65,518
    assert len(relay.frames("p-0", "h-1", Kind.DATA)) == 4  # chunks of 65,517


# --- three participants ------------------------------------------------------------------------

def test_broadcast_reaches_all_and_slots_name_each_sender() -> None:
    relay, _, parts = keyed(3)
    assert sorted(p.link.slot for p in parts if p.link) == [0, 1, 2]
    relay.send("h-1", b"to everyone")
    for p in parts:
        relay.send(p.peer_id, f"from {p.peer_id}".encode())
        relay.send(p.peer_id, f"again {p.peer_id}".encode())
    relay.run()
    for p in parts:
        assert relay.take(p.peer_id) == [("h-1", b"to everyone")]
    got = relay.take("h-1")
    assert len(got) == 6
    for p in parts:  # in order per sender
        assert [d for s, d in got if s == p.peer_id] == [f"from {p.peer_id}".encode(),
                                                        f"again {p.peer_id}".encode()]


def test_a_late_participant_gets_only_messages_sent_after_its_join() -> None:
    relay, host, (early,) = keyed()
    relay.send("h-1", b"before")
    relay.run()
    late = make_participant("p-late")
    relay.connect(late)
    relay.run()
    assert late.ready and host.participants == ["p-0", "p-late"]
    relay.send("h-1", b"after")
    relay.run()
    assert relay.take("p-0") == [("h-1", b"before"), ("h-1", b"after")]
    assert relay.take("p-late") == [("h-1", b"after")]
    relay.settle()
    assert host.unacked == 0 and early.unacked == 0


# --- resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("away", "sender"), [("p-0", "h-1"), ("h-1", "p-0")],
                         ids=["participant-away", "host-away"])
def test_a_receiver_away_gets_everything_once_on_return(away: str, sender: str) -> None:
    relay, _, _ = keyed()
    relay.send(sender, b"m0")
    relay.settle()
    relay.disconnect(away)
    for i in range(1, 6):
        relay.send(sender, f"m{i}".encode())  # each one discarded by the relay
    relay.run()
    engine = relay.peers[sender].engine
    assert relay.take(away) == [(sender, b"m0")] and engine.unacked == 5
    relay.connect(relay.peers[away].engine)
    relay.settle()
    assert relay.take(away) == [(sender, f"m{i}".encode()) for i in range(1, 6)]
    assert engine.unacked == 0


def test_both_away_then_back_deliver_both_ways_once() -> None:
    relay, host, (part,) = keyed()
    relay.disconnect("p-0")
    relay.send("h-1", b"h0")
    relay.disconnect("h-1")
    relay.send("p-0", b"p0")
    relay.send("h-1", b"h1")
    relay.run()
    relay.connect(part)
    relay.send("p-0", b"p1")
    relay.connect(host)
    relay.settle()
    assert relay.take("p-0") == [("h-1", b"h0"), ("h-1", b"h1")]
    assert relay.take("h-1") == [("p-0", b"p0"), ("p-0", b"p1")]
    assert host.unacked == 0 and part.unacked == 0


def test_a_frame_past_the_gap_while_recovering_asks_the_host_to_resend() -> None:
    relay, host, (part,) = keyed()
    relay.disconnect("p-0")
    relay.send("h-1", b"m1")  # discarded by the relay
    relay.connect(part)
    relay.send("h-1", b"m2")  # reaches p-0 before the host's resend: seq 2, expecting 1
    relay.settle()
    assert relay.take("p-0") == [("h-1", b"m1"), ("h-1", b"m2")]
    sealed_up = [f for f in relay.frames("p-0", "h-1", Kind.CONTROL) if f.payload[0] == 0x10]
    assert len(sealed_up) == 1 and host.unacked == 0  # one resend request per recovery


def test_a_participant_frame_past_the_gap_gets_a_targeted_resend_request() -> None:
    relay, host, (part, _) = keyed(2)
    relay.disconnect("h-1")
    relay.send("p-0", b"m1")  # discarded by the relay
    relay.connect(host)
    relay.send("p-0", b"m2")  # reaches the host before p-0's resend
    relay.settle()
    assert relay.take("h-1") == [("p-0", b"m1"), ("p-0", b"m2")]
    targeted = [f for f in relay.frames("h-1", "p-1", Kind.CONTROL) if f.payload[0] == 0x11]
    assert [f.payload[1] for f in targeted] == [0]  # p-0's slot; p-1 ignores it
    assert part.unacked == 0


NAMES = ("h-1", "p-0", "p-1", "p-2")
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from(NAMES), st.sampled_from([5, 5, 5, 70_000])),
    st.tuples(st.just("toggle"), st.sampled_from(NAMES), st.just(0)),
    st.tuples(st.just("deliver"), st.sampled_from(NAMES), st.integers(1, 12)),
    st.tuples(st.just("advance"), st.sampled_from(NAMES), st.sampled_from([10, 60])),
), max_size=60)


@settings(deadline=None, max_examples=300)
@given(ACTIONS)
def test_random_disconnects_deliver_everything_once_in_order(
        actions: list[tuple[str, str, int]]) -> None:
    limits = StreamLimits(max_unacked_frames=12, resume_timeout_s=1e9)
    relay, host, parts = keyed(3, limits=limits)
    sent: dict[str, list[bytes]] = {name: [] for name in NAMES}
    for action, name, arg in actions:
        peer = relay.peers[name]
        if action == "send":
            data = f"{name}#{len(sent[name])}:".encode().ljust(arg, b".")
            if peer.engine.can_send(len(data)):  # else the application would wait
                relay.send(name, data)
                sent[name].append(data)
        elif action == "toggle" and peer.online:
            relay.disconnect(name)
        elif action == "toggle":
            relay.connect(peer.engine)
        elif action == "deliver":
            for _ in range(min(arg, len(relay.queue))):
                relay.step()
        else:
            relay.advance(arg / 1000)
    for peer in relay.peers.values():
        if not peer.online:
            relay.connect(peer.engine)
    relay.settle()
    for p in parts:
        assert relay.take(p.peer_id) == [("h-1", data) for data in sent["h-1"]]
        assert p.unacked == 0
    got = relay.take("h-1")
    for p in parts:
        assert [d for s, d in got if s == p.peer_id] == sent[p.peer_id]
    assert len(got) == sum(len(sent[p.peer_id]) for p in parts)
    assert host.unacked == 0 and host.outbox.buffered_bytes == 0


# --- backpressure ------------------------------------------------------------------------------

@pytest.mark.parametrize("sender", ["h-1", "p-0"])
def test_can_send_is_false_at_the_replay_bound_and_true_after_acks(sender: str) -> None:
    relay, _, _ = keyed(limits=StreamLimits(max_unacked_frames=3))
    engine = relay.peers[sender].engine
    for _ in range(3):
        assert engine.can_send(10)
        relay.send(sender, b"x" * 10)
        relay.run()
    assert not engine.can_send(10) and engine.unacked == 3
    relay.advance(LIMITS.ack_delay_s)  # the receiver's ack timer fires
    relay.run()
    assert engine.unacked == 0 and engine.can_send(10)


def test_byte_bound_stops_sends_too() -> None:
    relay, host, _ = keyed(limits=StreamLimits(max_unacked_bytes=3000))
    relay.send("h-1", b"x" * 2000)
    assert not host.can_send(2000) and host.can_send(500)
    relay.settle()
    assert host.can_send(2000)


# --- wrong PSK, restarts -----------------------------------------------------------------------

def test_wrong_psk_fails_the_participant_and_the_host_refuses_it() -> None:
    relay, host = Relay(), make_host()
    relay.connect(host)
    part = make_participant("p-0", psk=b"another-secret-of-this-session")
    relay.connect(part)
    with pytest.raises(WrongPskError, match="wrong PSK"):
        relay.run()
    relay.run()  # the participant's reject reaches the host
    assert not part.ready and not host.ready and host.participants == []
    assert host.notices[-1].what == "refused" and "PSK" in host.notices[-1].detail
    assert [f.payload[0] for f in relay.frames("p-0", "h-1", Kind.CONTROL)] == [0x01, 0x04]


def test_a_restarted_host_gets_a_new_handshake_when_nothing_was_lost() -> None:
    relay, _, (part,) = keyed()
    relay.send("h-1", b"old")
    relay.send("p-0", b"old up")
    relay.settle()
    assert part.unacked == 0
    relay.disconnect("h-1")
    relay.connect(new_host := make_host(peer_id="h-2"))
    relay.run()
    assert part.link is not None and part.link.host_peer_id == "h-2"
    assert what(new_host) == [("p-0", "ready")] and what(part)[-1] == ("h-2", "ready")
    relay.take("p-0")
    relay.send("h-2", b"new")
    relay.send("p-0", b"new up")
    relay.run()
    assert relay.take("p-0") == [("h-2", b"new")]
    assert relay.take("h-2") == [("p-0", b"new up")]


def test_a_restarted_host_fails_a_participant_with_unacked_frames() -> None:
    relay, _, (part,) = keyed()
    relay.disconnect("h-1")
    relay.send("p-0", b"never acknowledged")
    relay.connect(make_host(peer_id="h-2"))
    with pytest.raises(ChannelError, match="1 frames it never acknowledged are lost"):
        relay.run()
    assert part.unacked == 1


def test_a_restarted_participant_replaces_its_old_state_at_the_host() -> None:
    relay, host, _ = keyed()
    relay.send("p-0", b"from old")
    relay.send("h-1", b"to old")
    relay.run()
    new = make_participant("p-0")
    relay.connect(new)
    relay.run()
    assert new.ready and ("p-0", "restarted") in what(host)
    assert host.participants == ["p-0"] and new.link is not None and new.link.slot == 1
    relay.send("h-1", b"to new")
    relay.send("p-0", b"from new")
    relay.settle()
    assert relay.take("p-0") == [("h-1", b"to old"), ("h-1", b"to new")]  # old, then new
    assert relay.take("h-1") == [("p-0", b"from old"), ("p-0", b"from new")]
    assert host.unacked == 0 and new.unacked == 0


# --- finish, leave, resume timeout -------------------------------------------------------------

def test_close_frames_finish_participants_and_then_the_host() -> None:
    relay, host, (a, b) = keyed(2)
    relay.send("p-0", b"last words")
    relay.close("p-0", "done")
    relay.run()
    assert relay.take("h-1") == [("p-0", b"last words")]
    assert host.notices[-1].what == "finished" and host.notices[-1].detail == "done"
    assert a.unacked == 0  # the close was acked at once, no timer needed
    assert host.ended is None
    relay.send("h-1", b"still listening")  # a half-close: p-0 still receives
    relay.close("p-1", "")
    relay.run()
    assert host.ended == "every participant finished its stream" and b.unacked == 0
    assert relay.take("p-0") == [("h-1", b"still listening")]
    relay.close("h-1", "bye")
    relay.run()
    assert a.ended == b.ended == "bye" and host.unacked == 0  # the close is acked at once


def test_a_leave_forgets_a_finished_participant_at_once() -> None:
    relay, host, (a, _) = keyed(2)
    relay.close("p-0", "done")
    relay.run()
    relay.send("h-1", b"p-0 never acks this")
    relay.run()
    assert host.unacked == 1
    a.send_leave()
    relay.disconnect("p-0")
    relay.run()
    assert what(host)[-1] == ("p-0", "left") and host.participants == ["p-1"]
    relay.settle()
    assert host.unacked == 0


def test_a_finished_participant_that_drops_is_held_for_its_return() -> None:
    limits = StreamLimits(resume_timeout_s=30.0)
    relay, host, (a,) = keyed(limits=limits)
    relay.close("p-0", "done")
    relay.disconnect("p-0")  # no leave: it may come back for the host's stream
    relay.send("h-1", b"for later")
    relay.run()
    assert host.participants == ["p-0"] and host.unacked == 1
    relay.connect(a)
    relay.settle()
    assert relay.take("p-0") == [("h-1", b"for later")]
    assert host.unacked == 0 and a.unacked == 0 and host.ended is not None


def test_a_participant_that_stays_away_is_forgotten_and_its_frames_released() -> None:
    limits = StreamLimits(resume_timeout_s=30.0)
    relay, host, _ = keyed(2, limits=limits)
    relay.disconnect("p-1")
    relay.run()
    relay.send("h-1", b"while p-1 is away")
    relay.settle()
    assert host.unacked == 1  # held for p-1
    relay.advance(29.9 - relay.now)  # p-1 left at 0.0
    assert host.participants == ["p-0", "p-1"]
    relay.advance(0.1001)
    assert host.participants == ["p-0"] and host.notices[-1].what == "forgotten"
    assert host.unacked == 0


def test_a_forgotten_participant_that_returns_handshakes_again() -> None:
    limits = StreamLimits(resume_timeout_s=30.0)
    relay, host, parts = keyed(2, limits=limits)
    p1 = parts[1]
    relay.disconnect("p-1")
    relay.run()
    relay.advance(31.0)
    assert host.participants == ["p-0"]
    relay.connect(p1)  # it still holds the old keys; the host tells it to start over
    relay.settle()
    assert host.participants == ["p-0", "p-1"] and p1.ready
    relay.send("h-1", b"welcome back")
    relay.send("p-1", b"hello again")
    relay.settle()
    assert relay.take("p-1") == [("h-1", b"welcome back")]
    assert ("p-1", b"hello again") in relay.take("h-1")


def test_a_forgotten_participant_with_unacked_frames_fails_naming_the_loss() -> None:
    limits = StreamLimits(resume_timeout_s=30.0)
    relay, host, parts = keyed(1, limits=limits)
    part = parts[0]
    relay.disconnect("p-0")
    relay.run()
    relay.send("p-0", b"never acknowledged")  # sealed while away: stays in its buffer
    relay.advance(31.0)
    assert host.participants == []
    with pytest.raises(ChannelError, match=r"forgot this participant.*1 frames"):
        relay.connect(part)
        relay.settle()


def test_a_participant_that_left_while_the_host_was_away_is_forgotten_too() -> None:
    limits = StreamLimits(resume_timeout_s=30.0)
    relay, host, _ = keyed(2, limits=limits)
    relay.disconnect("h-1")
    relay.disconnect("p-1")  # the host never hears a peer_left for it
    relay.send("h-1", b"while away")
    relay.connect(host)
    relay.settle()
    assert host.unacked == 1
    relay.advance(31.0)
    assert host.participants == ["p-0"] and host.unacked == 0


# --- what a misbehaving relay achieves ---------------------------------------------------------

def flip(offset: int, mask: int = 0x02) -> Tamper:
    """XOR ``mask`` into the byte at ``offset`` (negative: from the end) of the first host data
    frame (seq 1: the default mask makes the header say seq 3)."""
    done: list[bool] = []

    def tamper(sender: str, _receiver: str, raw: bytes) -> bytes:
        if sender != "h-1" or raw[1] != Kind.DATA or done:
            return raw
        done.append(True)
        data = bytearray(raw)
        data[offset] ^= mask
        return bytes(data)
    return tamper


@pytest.mark.parametrize("offset", [7, 8, -1], ids=["header-seq", "payload", "tag"])
def test_a_flipped_bit_in_a_host_data_frame_is_an_integrity_error(offset: int) -> None:
    relay, _, _ = keyed()
    relay.tamper = flip(offset)
    relay.send("h-1", b"important")
    with pytest.raises(IntegrityError):
        relay.run()
    assert relay.take("p-0") == []


def drop_second(sender: str, _receiver: str, raw: bytes) -> bytes | None:
    """Drop the host's second data frame (seq 2)."""
    return None if sender == "h-1" and raw[:2] == b"\x01\x01" and raw[7] == 2 else raw


@pytest.mark.parametrize(("tamper", "before"), [(drop_second, [("h-1", b"m0")]),
                                               (flip(7, mask=0x01), [])], ids=["dropped", "seq-0"])
def test_a_lost_host_frame_is_a_gap_error_at_the_next_one(
        tamper: Tamper, before: list[tuple[str, bytes]]) -> None:
    relay, _, _ = keyed()
    relay.tamper = tamper  # seq 1 rewritten to seq 0 is dropped as "before our start_seq"
    for i in range(3):
        relay.send("h-1", f"m{i}".encode())
    with pytest.raises(GapError, match="frames lost between"):
        relay.run()
    assert relay.take("p-0") == before


def test_a_replayed_frame_outside_a_resend_is_a_replay_error() -> None:
    relay, _, _ = keyed()
    relay.send("h-1", b"once")
    relay.send("p-0", b"once up")
    relay.run()
    relay.inject("p-0", relay.frames("h-1", "p-0", Kind.DATA)[0])
    with pytest.raises(ReplayError):
        relay.run()
    relay.inject("h-1", relay.frames("p-0", "h-1", Kind.DATA)[0])
    with pytest.raises(ReplayError):
        relay.run()
    assert relay.take("p-0") == [("h-1", b"once")] and relay.take("h-1") == [("p-0", b"once up")]


def reslot(slot: int) -> Tamper:
    """Rewrite the slot byte of p-0's data frames to the host."""
    def tamper(sender: str, _receiver: str, raw: bytes) -> bytes:
        if sender == "p-0" and raw[1] == Kind.DATA:
            return raw[:8] + bytes((slot,)) + raw[9:]
        return raw
    return tamper


@pytest.mark.parametrize("slot", [1, 200], ids=["another-participants", "free"])
def test_a_frame_moved_to_another_slot_is_never_delivered(slot: int) -> None:
    """Moved to p-1's slot, p-0's frame is opened with p-1's key and fails: IntegrityError.
    Moved to a free slot it is ignored, and the hole is a GapError at p-0's next frame."""
    relay, _, _ = keyed(2)
    relay.tamper = reslot(slot)
    relay.send("p-0", b"moved")
    relay.tamper = None
    relay.send("p-0", b"next")
    with pytest.raises(IntegrityError) as failure:
        relay.run()
    assert isinstance(failure.value, GapError) == (slot == 200)
    assert relay.take("h-1") == []


def test_a_forged_ack_fails_authentication() -> None:
    relay, _, _ = keyed()
    relay.send("h-1", b"m")
    relay.settle()
    ack = relay.frames("p-0", "h-1", Kind.ACK)[-1]
    relay.inject("h-1", replace(ack, payload=ack.payload[:-1] + bytes((ack.payload[-1] ^ 1,))))
    with pytest.raises(IntegrityError):
        relay.run()
