"""Session registry: who is in which session, and what a join or a leave implies.

This module is sans-I/O. It stores opaque connection objects (type ``C``) and answers
the decisions the relay must take when peers come and go; the I/O layer carries them
out (sending hellos and events, closing replaced connections).

Rules (protocol v1, section 4):

- a session has at most one host and up to ``max_participants`` participants;
- a join whose ``peer_id`` is already present replaces that member, whatever its role;
- a host join replaces the current host;
- a participant join past the limit is refused (``SessionFull``);
- connections still in their handshake count against ``max_connections_per_session``
  through :meth:`Registry.reserve`, so one session cannot hoard a worker's slots;
- a session whose last member left is kept for ``grace_s`` (a reconnecting peer finds
  it) and then dropped by :meth:`Registry.expire`.

Each session keeps ``participant_conns`` and ``host_conns`` tuples, rebuilt on every
membership change, so the relay's hot path reads its receivers with one attribute
lookup.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Role = Literal["host", "participant"]
HOST: Role = "host"
PARTICIPANT: Role = "participant"

C = TypeVar("C")


class SessionFull(Exception):
    """The session already has ``max_participants`` participants."""


class TooManyConnections(Exception):
    """The session already has ``max_connections_per_session`` connections."""


@dataclass(eq=False, slots=True)
class Member(Generic[C]):
    """One joined connection: its role, its stable peer id and the I/O object."""

    role: Role
    peer_id: str
    conn: C


@dataclass(eq=False, slots=True)
class Session(Generic[C]):
    """The members of one session and the receivers each side writes to."""

    session_id: str
    created_at: float
    host: Member[C] | None = None
    participants: dict[str, Member[C]] = field(default_factory=dict)
    reserved: int = 0
    empty_since: float | None = None
    host_conns: tuple[C, ...] = ()
    participant_conns: tuple[C, ...] = ()

    @property
    def member_count(self) -> int:
        return len(self.participants) + (self.host is not None)

    def members(self) -> Iterator[Member[C]]:
        """Yield the host (if any) then the participants."""
        if self.host is not None:
            yield self.host
        yield from self.participants.values()

    def counterparts(self, role: Role) -> tuple[C, ...]:
        """The connections a member of ``role`` exchanges frames (and events) with."""
        return self.participant_conns if role == HOST else self.host_conns

    def _refresh(self) -> None:
        self.host_conns = () if self.host is None else (self.host.conn,)
        self.participant_conns = tuple(m.conn for m in self.participants.values())

    def _find(self, peer_id: str) -> Member[C] | None:
        if self.host is not None and self.host.peer_id == peer_id:
            return self.host
        return self.participants.get(peer_id)

    def _remove(self, member: Member[C]) -> bool:
        if member is self.host:
            self.host = None
        elif self.participants.get(member.peer_id) is member:
            del self.participants[member.peer_id]
        else:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Replaced(Generic[C]):
    """A member a join displaced: close it with REPLACED and tell ``notify`` (``peer_left``)."""

    member: Member[C]
    notify: tuple[C, ...]


@dataclass(frozen=True, slots=True)
class JoinResult(Generic[C]):
    """What a successful join implies for the I/O layer.

    ``replaced`` lists the members displaced (the same peer id, and the previous host
    when a host joins; both when a participant comes back as host); ``notify`` get
    ``peer_joined`` for the new member; ``present`` are the counterparts the newcomer
    is told about.
    """

    member: Member[C]
    session: Session[C]
    replaced: tuple[Replaced[C], ...]
    notify: tuple[C, ...]
    present: tuple[Member[C], ...]
    host_present: bool
    participant_count: int


@dataclass(frozen=True, slots=True)
class LeaveResult(Generic[C]):
    """Who must be told (``peer_left``) that ``member`` left; empty if it had left already."""

    member: Member[C]
    notify: tuple[C, ...]


class Registry(Generic[C]):
    """All sessions of one worker. Time comes in as ``now`` (monotonic seconds)."""

    def __init__(self, *, max_participants: int, max_connections_per_session: int,
                 grace_s: float) -> None:
        self.max_participants = max_participants
        self.max_connections_per_session = max_connections_per_session
        self.grace_s = grace_s
        self.sessions: dict[str, Session[C]] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> Session[C] | None:
        """Return the session with this id, or None."""
        return self.sessions.get(session_id)

    def reserve(self, session_id: str, now: float) -> Session[C]:
        """Count a connection that starts its handshake; pair with :meth:`release`.

        Raises :class:`TooManyConnections` when the session is at its connection limit.
        """
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(session_id, created_at=now)
        if session.reserved + session.member_count >= self.max_connections_per_session:
            self._mark_if_empty(session, now)
            raise TooManyConnections(session_id)
        session.reserved += 1
        session.empty_since = None
        return session

    def release(self, session: Session[C], now: float) -> None:
        """Undo one :meth:`reserve` (the handshake ended, joined or not)."""
        session.reserved -= 1
        self._mark_if_empty(session, now)

    def join(self, session: Session[C], role: Role, peer_id: str, conn: C) -> JoinResult[C]:
        """Add ``conn`` to a reserved session, replacing a stale member if needed.

        Raises :class:`SessionFull` when a new participant would exceed the limit. The
        reservation is not consumed; the caller still calls :meth:`release`.
        """
        displaced = [m for m in (session._find(peer_id),
                                 session.host if role == HOST else None) if m is not None]
        displaced = list(dict.fromkeys(displaced))  # the same member may match twice
        frees_participant = any(m.role == PARTICIPANT for m in displaced)
        if (role == PARTICIPANT and len(session.participants) >= self.max_participants
                and not frees_participant):
            raise SessionFull(session.session_id)
        for old in displaced:
            session._remove(old)
        session._refresh()
        replaced = tuple(Replaced(old, session.counterparts(old.role)) for old in displaced)
        member = Member(role, peer_id, conn)
        if role == HOST:
            session.host = member
        else:
            session.participants[peer_id] = member
        session._refresh()
        session.empty_since = None
        present = (tuple(session.participants.values()) if role == HOST
                   else (() if session.host is None else (session.host,)))
        return JoinResult(
            member=member, session=session, replaced=replaced,
            notify=session.counterparts(role),
            present=present, host_present=session.host is not None and role != HOST,
            participant_count=len(session.participants) - (role == PARTICIPANT))

    def leave(self, session: Session[C], member: Member[C], now: float) -> LeaveResult[C]:
        """Remove ``member`` if it is still current; idempotent."""
        if not session._remove(member):
            return LeaveResult(member, ())
        session._refresh()
        self._mark_if_empty(session, now)
        return LeaveResult(member, session.counterparts(member.role))

    def expire(self, now: float) -> list[str]:
        """Drop sessions empty for at least ``grace_s``; return their ids."""
        return [s.session_id for s in self.expire_sessions(now)]

    def expire_sessions(self, now: float) -> list[Session[C]]:
        """Drop sessions empty for at least ``grace_s``; return them."""
        gone = [s for s in self.sessions.values()
                if s.empty_since is not None and now - s.empty_since >= self.grace_s]
        for s in gone:
            del self.sessions[s.session_id]
        return gone

    def _mark_if_empty(self, session: Session[C], now: float) -> None:
        if session.member_count == 0 and session.reserved == 0 and session.empty_since is None:
            session.empty_since = now
