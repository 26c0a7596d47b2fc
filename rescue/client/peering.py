"""The end-to-end protocol between peers, without I/O: handshakes, streams, acks, resume.

One engine per channel. The I/O adapter (:mod:`rescue.client.channel`) feeds it what the
relay delivers — its own (re)connection, ``peer_joined``/``peer_left`` events, frames —
and the application's messages, and writes out :meth:`PeerEngine.data_to_send`.
Everything here follows ``docs/protocol.md`` section 10:

- a **participant** offers a key exchange when it meets a host it has no keys with, then
  sends its stream (sealed with its pairwise key) to the host and receives the host's
  broadcast stream (sealed with the host's group key);
- the **host** answers every participant's offer, gives each a one-byte *slot* that
  prefixes the participant's post-handshake frames (the relay does not say who sent a
  frame), and broadcasts one stream to all;
- after a reconnect on either side, or a counterpart's ``peer_joined``, each sender resends
  what its receivers have not acknowledged; receivers drop the duplicates by seq.

Frames written while the adapter has no connection are simply dropped by it: stream
frames stay in the replay buffer until acknowledged, and the handshake and ack messages
are repeated on the next ``peer_joined``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rescue.client.e2e import (
    SEALED_CONTROL,
    Accept,
    Confirm,
    FrameCipher,
    HostHandshake,
    Offer,
    PairKeys,
    ParticipantHandshake,
    Reject,
    RejectReason,
    Suite,
    parse_handshake,
)
from rescue.client.errors import ChannelError, HandshakeError, IntegrityError, WrongPskError
from rescue.client.slotted import TARGETED_CONTROL, SlotCipher, seal_targeted, split_slot
from rescue.client.stream import (
    MAX_CHUNK,
    Delivery,
    Inbox,
    Outbox,
    ResendRequest,
    encode_leave,
    encode_resend_request,
    parse_control_body,
)
from rescue.frames import Frame, Kind, encode_frame

HOST = "host"


@dataclass(frozen=True, slots=True)
class Message:
    """One application message and the peer that sent it."""

    data: bytes
    peer_id: str


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Bounds of the replay buffer, reassembly and acknowledgement pacing."""

    max_unacked_bytes: int = 4 << 20
    max_unacked_frames: int = 4096
    max_message_bytes: int = 16 << 20
    ack_every_frames: int = 16
    ack_every_bytes: int = 256 << 10
    ack_delay_s: float = 0.05
    resume_timeout_s: float = 60.0


@dataclass
class PeerNotice:
    """Something the application should hear about that does not end the channel."""

    peer_id: str
    what: str  # "ready", "closed", "refused", "forgotten"
    detail: str = ""


class PeerEngine:
    """What both roles share: outgoing frames, received messages, notices, acks."""

    def __init__(self, session_id: str, peer_id: str, psk: bytes, limits: StreamLimits) -> None:
        self.session_id = session_id
        self.peer_id = peer_id
        self.psk = psk
        self.limits = limits
        self._out: list[bytes] = []
        self._received: list[Message] = []
        self.notices: list[PeerNotice] = []
        self.ended: str | None = None  # why the counterpart ended the conversation

    # --- what the adapter drains ---------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Frames to write to the current connection, in order (and forget)."""
        out, self._out = self._out, []
        return out

    def messages_received(self) -> list[Message]:
        """Application messages delivered since the last call, in order."""
        received, self._received = self._received, []
        return received

    def _inbox(self, cipher: FrameCipher | SlotCipher, start_seq: int = 1) -> Inbox:
        lim = self.limits
        return Inbox(cipher, start_seq=start_seq, max_message_bytes=lim.max_message_bytes,
                     ack_every_frames=lim.ack_every_frames, ack_every_bytes=lim.ack_every_bytes,
                     ack_delay_s=lim.ack_delay_s)

    def _outbox(self, cipher: FrameCipher | SlotCipher, max_chunk: int) -> Outbox:
        lim = self.limits
        return Outbox(cipher, max_unacked_bytes=lim.max_unacked_bytes,
                      max_unacked_frames=lim.max_unacked_frames, max_chunk=max_chunk)

    def _deliver(self, delivery: Delivery, sender: str) -> None:
        for data in delivery.messages:
            self._received.append(Message(data, sender))


# --- the participant -----------------------------------------------------------------------


@dataclass
class _HostLink:
    """A participant's keys and streams with one host instance."""

    host_peer_id: str
    slot: int
    keys_confirm: bytes  # the confirm message, repeated after reconnects
    outbox: Outbox
    inbox: Inbox
    pair: PairKeys


class ParticipantEngine(PeerEngine):
    """A participant: one host at a time, a pairwise stream up and the group stream down."""

    def __init__(self, session_id: str, peer_id: str, psk: bytes,
                 suites: frozenset[Suite], limits: StreamLimits) -> None:
        super().__init__(session_id, peer_id, psk, limits)
        self.suites = suites
        self._handshake: ParticipantHandshake | None = None
        self._offer: bytes | None = None
        self._host_peer_id: str | None = None  # the host we are talking to (or offering to)
        self.link: _HostLink | None = None
        self._host_present = False

    @property
    def ready(self) -> bool:
        """True once keys with a host are agreed: messages can be sealed."""
        return self.link is not None

    def can_send(self, size: int) -> bool:
        """True when a message of ``size`` bytes fits the replay buffer now."""
        return self.link is not None and self.link.outbox.room_for(size)

    def send_message(self, data: bytes) -> None:
        """Seal one message for the host (the caller checked :meth:`can_send`)."""
        if self.link is None:
            raise ChannelError("no keys with a host yet")
        self._out.extend(self.link.outbox.seal_message(data))

    def send_close(self, reason: str) -> None:
        """End this participant's stream in order (a close frame after every message)."""
        if self.link is not None:
            self._out.append(self.link.outbox.seal_close(reason))

    def send_leave(self) -> None:
        """Tell the host we are gone for good, so it holds nothing back for us."""
        if self.link is not None:
            self._out.append(self.link.outbox.seal_control(encode_leave()))

    @property
    def unacked(self) -> int:
        """Frames not yet acknowledged by the host."""
        return 0 if self.link is None else self.link.outbox.buffered_frames

    @property
    def abandoned(self) -> bool:
        """True when the host finished its stream and left: nobody will acknowledge ours."""
        return self.ended is not None and not self._host_present

    def connected(self, now: float) -> None:
        """Our own new connection: frames from the host may have been lost meanwhile."""
        self._host_present = False  # until the relay's peer_joined says otherwise
        if self.link is not None:
            self.link.inbox.start_recovering()

    def peer_joined(self, role: str, peer_id: str, now: float) -> None:
        """A host joined (or was present when we joined): offer keys or resume."""
        if role != HOST:
            return
        self._host_present = True
        link = self.link
        if link is not None and link.host_peer_id == peer_id:
            link.inbox.start_recovering()
            self._out.append(encode_frame(Kind.CONTROL, 0, link.keys_confirm))
            self._out.extend(link.outbox.resend())
            self._ack(now, force=True)
            return
        if link is not None:  # a different host instance: the old stream cannot continue
            if link.outbox.buffered_frames:
                raise ChannelError(
                    f"the host restarted (new peer id {peer_id!r}); "
                    f"{link.outbox.buffered_frames} frames it never acknowledged are lost")
            self.link = None
        if self._host_peer_id != peer_id or self._offer is None:
            self._handshake = ParticipantHandshake(self.session_id, self.peer_id, self.psk,
                                                   self.suites)
            self._offer = self._handshake.offer().encode()
            self._host_peer_id = peer_id
        self._out.append(encode_frame(Kind.CONTROL, 0, self._offer))

    def peer_left(self, role: str, peer_id: str, reason: str, now: float) -> None:
        """The host went away: its frames in flight may be lost until it resends."""
        if role == HOST:
            self._host_present = False
        if role == HOST and self.link is not None and self.link.host_peer_id == peer_id:
            self.link.inbox.start_recovering()

    def on_frame(self, frame: Frame, now: float) -> None:
        """Handle one frame from the host (raises IntegrityError/HandshakeError when fatal)."""
        kind, payload = frame.kind, frame.payload
        if kind is Kind.CONTROL:
            self._on_control(frame, now)
            return
        link = self.link
        if link is None:
            return  # the host's stream before our keys: not for us
        if kind is Kind.ACK:
            slot, sealed = split_slot(payload)
            if slot != link.slot:
                return  # an ack for another participant
            link.pair.h2p.open(Kind.ACK, frame.seq, sealed, bytes((slot,)))
            link.outbox.on_ack(HOST, frame.seq)
            return
        if kind in (Kind.DATA, Kind.CLOSE):
            delivery = link.inbox.on_frame(kind, frame.seq, payload, now)
            self._after_delivery(delivery, link, now)

    def _on_control(self, frame: Frame, now: float) -> None:
        payload = frame.payload
        if not payload:
            raise IntegrityError("empty control frame")
        link = self.link
        if payload[0] == SEALED_CONTROL:
            if link is not None:
                self._after_delivery(link.inbox.on_control(frame.seq, payload), link, now)
            return
        if payload[0] == TARGETED_CONTROL:
            if link is not None:
                slot, body = split_slot(payload[1:])
                if slot == link.slot:
                    opened = link.pair.h2p.open(Kind.CONTROL, frame.seq, body,
                                                bytes((TARGETED_CONTROL, slot)))
                    request = parse_control_body(opened)
                    if isinstance(request, ResendRequest):
                        self._out.extend(link.outbox.resend(request.from_seq))
            return
        message = parse_handshake(payload)
        if isinstance(message, Accept) and message.to_peer_id == self.peer_id:
            self._on_accept(message)
        elif (isinstance(message, Reject) and message.to_peer_id == self.peer_id
              and message.reason == RejectReason.FORGOTTEN):
            self._on_forgotten()
        elif (isinstance(message, Reject) and message.to_peer_id == self.peer_id
              and self._handshake is not None):
            raise self._handshake.on_reject(message)

    def _on_forgotten(self) -> None:
        """The host dropped our keys (we were away too long): start over, or fail on loss."""
        link = self.link
        if link is None:
            return
        if link.outbox.buffered_frames:
            raise ChannelError(
                f"the host forgot this participant after it was away longer than the host's "
                f"resume timeout; {link.outbox.buffered_frames} frames it never acknowledged "
                f"are lost")
        self.link, self._offer = None, None
        self._handshake = ParticipantHandshake(self.session_id, self.peer_id, self.psk,
                                               self.suites)
        self._offer = self._handshake.offer().encode()
        self._out.append(encode_frame(Kind.CONTROL, 0, self._offer))

    def _on_accept(self, accept: Accept) -> None:
        if self._handshake is None or self._host_peer_id is None:
            return  # an accept we did not ask for (a replay): ignore
        if self.link is not None:
            return  # already keyed with this offer; a repeated accept changes nothing
        try:
            keys, confirm = self._handshake.on_accept(accept)
        except WrongPskError:  # tell the host too, so both sides report it
            reject = Reject(self.peer_id, RejectReason.BAD_CONFIRM)
            self._out.append(encode_frame(Kind.CONTROL, 0, reject.encode()))
            raise
        slot = keys.slot
        outbox = self._outbox(SlotCipher(keys.pair.p2h, slot), max_chunk=MAX_SLOTTED_CHUNK)
        outbox.add_receiver(HOST)
        inbox = self._inbox(keys.group, start_seq=keys.start_seq)
        confirm_bytes = confirm.encode()
        self.link = _HostLink(self._host_peer_id, slot, confirm_bytes, outbox, inbox,
                              keys.pair)
        self._out.append(encode_frame(Kind.CONTROL, 0, confirm_bytes))
        self.notices.append(PeerNotice(self._host_peer_id, "ready"))

    def _after_delivery(self, delivery: Delivery, link: _HostLink, now: float) -> None:
        self._deliver(delivery, link.host_peer_id)
        if delivery.resend_request is not None:
            self._out.append(link.outbox.seal_control(delivery.resend_request))
        if delivery.closed is not None:
            self.ended = delivery.closed or "the host closed the channel"
        self._ack(now, force=delivery.closed is not None)

    def _ack(self, now: float, *, force: bool = False) -> None:
        link = self.link
        if link is not None:
            _queue_ack(self._out, link.inbox, link.pair.p2h, link.slot, now=now, force=force)

    def tick(self, now: float) -> float | None:
        """Send acks that fell due; return the next time this needs a tick (or None)."""
        self._ack(now)
        return None if self.link is None else self.link.inbox.ack_deadline()


# --- the host ------------------------------------------------------------------------------


@dataclass
class _Participant:
    """The host's view of one participant."""

    peer_id: str
    slot: int
    offer_eph: bytes
    accept: bytes  # the accept message, repeated if the same offer comes again
    pair: PairKeys | None = None
    inbox: Inbox | None = None
    present: bool = True
    left_at: float | None = None
    finished: bool = False  # its stream ended (close frame); it may still receive ours


@dataclass
class _SlotTable:
    """One-byte slots for participants, handed out round-robin.

    A freed slot is reused only after every other free slot was, so a frame still in
    flight from a forgotten participant is unlikely to meet a new owner of its slot.
    """

    by_slot: dict[int, _Participant] = field(default_factory=dict)
    _next: int = 0

    def free_slot(self) -> int:
        for step in range(256):
            slot = (self._next + step) % 256
            if slot not in self.by_slot:
                self._next = (slot + 1) % 256
                return slot
        raise ChannelError("no free participant slot (256 in use)")


class HostEngine(PeerEngine):
    """The host: one broadcast stream to every participant, one stream from each."""

    def __init__(self, session_id: str, peer_id: str, psk: bytes, suite: Suite,
                 limits: StreamLimits) -> None:
        super().__init__(session_id, peer_id, psk, limits)
        self._handshake = HostHandshake(session_id, psk, suite)
        self.outbox = self._outbox(self._handshake.group, max_chunk=MAX_CHUNK)
        self._slots = _SlotTable()
        self._by_peer: dict[str, _Participant] = {}

    @property
    def ready(self) -> bool:
        """True while at least one participant holds keys: messages have someone to go to."""
        return any(p.pair is not None for p in self._by_peer.values())

    @property
    def abandoned(self) -> bool:
        """A host always has someone to wait for while participants hold keys."""
        return not self.ready

    @property
    def participants(self) -> list[str]:
        """Peer ids of the participants with keys (present or expected back)."""
        return [p.peer_id for p in self._by_peer.values() if p.pair is not None]

    def can_send(self, size: int) -> bool:
        """True when a message of ``size`` bytes fits the replay buffer now."""
        return self.ready and self.outbox.room_for(size)

    def send_message(self, data: bytes) -> None:
        """Seal one message for every participant (the caller checked :meth:`can_send`)."""
        self._out.extend(self.outbox.seal_message(data))

    def send_close(self, reason: str) -> None:
        """End the host's stream in order."""
        self._out.append(self.outbox.seal_close(reason))

    def send_leave(self) -> None:
        """A host leaving ends the session's stream; its close frame already said so."""

    @property
    def unacked(self) -> int:
        """Frames some participant has not acknowledged yet."""
        return self.outbox.buffered_frames

    def connected(self, now: float) -> None:
        """Our own new connection: every participant's frames may have been lost meanwhile.

        Each is held for ``resume_timeout_s`` from now unless its ``peer_joined`` follows: one
        that left while we were away sends no ``peer_left`` we could hear.
        """
        for p in self._by_peer.values():
            p.present = False
            if p.left_at is None:
                p.left_at = now
            if p.inbox is not None:
                p.inbox.start_recovering()

    def peer_joined(self, role: str, peer_id: str, now: float) -> None:
        """A participant is (back) on the relay: resume with it if it holds keys."""
        p = self._by_peer.get(peer_id)
        if role == HOST or p is None:
            return
        p.present, p.left_at = True, None
        if p.pair is None:
            self._out.append(encode_frame(Kind.CONTROL, 0, p.accept))
            return
        assert p.inbox is not None
        p.inbox.start_recovering()
        floor = self.outbox.acked_by(peer_id) + 1
        self._out.extend(self.outbox.resend(max(floor, self.outbox.oldest_seq())))
        self._ack(p, now, force=True)

    def peer_left(self, role: str, peer_id: str, reason: str, now: float) -> None:
        """A participant went away: hold its frames for ``resume_timeout_s``.

        Only its ``leave`` control frees them at once: having finished its own stream, a
        participant may still be receiving ours when its connection drops.
        """
        p = self._by_peer.get(peer_id)
        if role == HOST or p is None:
            return
        p.present, p.left_at = False, now
        if p.inbox is not None:
            p.inbox.start_recovering()

    def on_frame(self, frame: Frame, now: float) -> None:
        """Handle one frame from some participant (raises IntegrityError when fatal)."""
        kind, payload = frame.kind, frame.payload
        if kind is Kind.CONTROL:
            self._on_control(frame, now)
            return
        if kind not in (Kind.DATA, Kind.CLOSE, Kind.ACK):
            return
        slot, _ = split_slot(payload)
        p = self._slots.by_slot.get(slot)
        if p is None or p.pair is None or p.inbox is None:
            return  # a participant we do not (yet, or any more) hold keys with
        if kind is Kind.ACK:
            p.pair.p2h.open(Kind.ACK, frame.seq, payload[1:], bytes((slot,)))
            self.outbox.on_ack(p.peer_id, frame.seq)
            return
        delivery = p.inbox.on_frame(kind, frame.seq, payload, now)
        self._after_delivery(p, delivery, now)

    def _on_control(self, frame: Frame, now: float) -> None:
        payload = frame.payload
        if not payload:
            raise IntegrityError("empty control frame")
        if payload[0] == SEALED_CONTROL:
            if len(payload) < 2:
                raise IntegrityError("sealed control frame without a slot")
            p = self._slots.by_slot.get(payload[1])
            if p is not None and p.inbox is not None:
                self._after_delivery(p, p.inbox.on_control(frame.seq, payload), now)
            return
        message = parse_handshake(payload)
        if isinstance(message, Offer):
            self._on_offer(message)
        elif isinstance(message, Confirm):
            self._on_confirm(message)
        elif isinstance(message, Reject):  # a participant could not open our accept
            p = self._by_peer.get(message.to_peer_id)
            if p is not None and p.pair is None:
                self._handshake.forget(p.peer_id)
                self._forget(p, "refused", "wrong PSK: the participant could not open the "
                                           "accept (its pre-shared secret differs)")

    def _on_offer(self, offer: Offer) -> None:
        known = self._by_peer.get(offer.peer_id)
        if known is not None and known.offer_eph == offer.eph_pub:
            self._out.append(encode_frame(Kind.CONTROL, 0, known.accept))  # a repeat
            return
        if known is not None:  # the participant restarted: its old streams are gone
            self._forget(known, "restarted")
        slot = self._slots.free_slot()
        answer = self._handshake.on_offer(offer, self.outbox.next_seq, slot=slot)
        raw = answer.encode()
        self._out.append(encode_frame(Kind.CONTROL, 0, raw))
        if isinstance(answer, Reject):
            self.notices.append(PeerNotice(offer.peer_id, "refused", answer.reason.name))
            return
        p = _Participant(offer.peer_id, slot, offer.eph_pub, raw)
        self._slots.by_slot[slot] = p
        self._by_peer[offer.peer_id] = p
        self.outbox.add_receiver(offer.peer_id)

    def _on_confirm(self, confirm: Confirm) -> None:
        p = self._by_peer.get(confirm.peer_id)
        if p is None:  # keys we forgot (or never had): tell it to handshake again
            reject = Reject(confirm.peer_id, RejectReason.FORGOTTEN)
            self._out.append(encode_frame(Kind.CONTROL, 0, reject.encode()))
            return
        if p.pair is not None:
            return  # a repeated confirm after a reconnect
        try:
            pair = self._handshake.on_confirm(confirm)
        except HandshakeError as e:
            reject = Reject(confirm.peer_id, RejectReason.BAD_CONFIRM)
            self._out.append(encode_frame(Kind.CONTROL, 0, reject.encode()))
            self._forget(p, "refused")
            self.notices[-1].detail = str(e)
            return
        p.pair = pair
        p.inbox = self._inbox(SlotCipher(pair.p2h, p.slot))
        self.notices.append(PeerNotice(p.peer_id, "ready"))

    def _after_delivery(self, p: _Participant, delivery: Delivery, now: float) -> None:
        self._deliver(delivery, p.peer_id)
        if delivery.left:
            self._forget(p, "left")
            return
        if delivery.resend_requested_from is not None:  # it misses part of our stream
            self._out.extend(self.outbox.resend(delivery.resend_requested_from))
        if delivery.resend_request is not None and p.pair is not None:
            request = parse_control_body(delivery.resend_request)
            assert isinstance(request, ResendRequest)
            body = encode_resend_request(request.from_seq)
            self._out.append(seal_targeted(self.outbox, p.pair.h2p, p.slot, body))
        if delivery.closed is not None:
            p.finished = True
            self._ack(p, now, force=True)  # the sender lingers for this ack
            self.notices.append(PeerNotice(p.peer_id, "finished", delivery.closed))
            if all(q.finished for q in self._by_peer.values() if q.pair is not None):
                self.ended = "every participant finished its stream"
            return
        self._ack(p, now)

    def _ack(self, p: _Participant, now: float, *, force: bool = False) -> None:
        if p.inbox is not None and p.pair is not None:
            _queue_ack(self._out, p.inbox, p.pair.h2p, p.slot, now=now, force=force)

    def _forget(self, p: _Participant, what: str, detail: str = "") -> None:
        self._by_peer.pop(p.peer_id, None)
        self._slots.by_slot.pop(p.slot, None)
        self.outbox.remove_receiver(p.peer_id)
        self.notices.append(PeerNotice(p.peer_id, what, detail))

    def tick(self, now: float) -> float | None:
        """Send due acks and forget participants gone too long; return the next deadline."""
        deadlines: list[float] = []
        for p in list(self._by_peer.values()):
            if p.left_at is not None:
                expiry = p.left_at + self.limits.resume_timeout_s
                if now >= expiry:
                    self._forget(p, "forgotten", "did not come back in time")
                    continue
                deadlines.append(expiry)
            self._ack(p, now)
            if p.inbox is not None:
                due = p.inbox.ack_deadline()
                if due is not None:
                    deadlines.append(due)
        return min(deadlines) if deadlines else None


MAX_SLOTTED_CHUNK = MAX_CHUNK - 1


def _queue_ack(out: list[bytes], inbox: Inbox, cipher: FrameCipher, slot: int, *,
               now: float, force: bool) -> None:
    """Append an ack frame (``slot || sealed empty``) when ``inbox``'s policy says one is
    due, or, with ``force``, for whatever was delivered so far."""
    seq = inbox.ack_due(now)
    if seq is None and force:
        seq = inbox.last_delivered()
    if seq is None or seq < 1:
        return
    tag = bytes((slot,))
    out.append(encode_frame(Kind.ACK, seq, tag + cipher.seal(Kind.ACK, seq, b"", tag)))
    inbox.ack_sent(seq, now)
