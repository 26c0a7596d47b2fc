"""Tests for rescue.sessions: the session registry's join, replace, limit and expiry rules."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rescue.sessions import (
    HOST,
    PARTICIPANT,
    JoinResult,
    Member,
    Registry,
    Replaced,
    Role,
    Session,
    SessionFull,
    TooManyConnections,
)

SID = "session-1"
GRACE = 10.0


def make_registry(max_participants: int = 3, max_connections: int = 8,
                  grace_s: float = GRACE) -> Registry[str]:
    return Registry(max_participants=max_participants,
                    max_connections_per_session=max_connections, grace_s=grace_s)


def connect(reg: Registry[str], role: Role, peer_id: str, conn: str, *, now: float = 0.0,
            sid: str = SID) -> JoinResult[str]:
    """Run a connection's whole handshake: reserve, join, release (as the relay does)."""
    session = reg.reserve(sid, now)
    try:
        return reg.join(session, role, peer_id, conn)
    finally:
        reg.release(session, now)


def session_of(reg: Registry[str], sid: str = SID) -> Session[str]:
    session = reg.get(sid)
    assert session is not None
    return session


def conns(members: tuple[Member[str], ...]) -> tuple[str, ...]:
    return tuple(m.conn for m in members)


def only_replaced(result: JoinResult[str]) -> Replaced[str]:
    """The single member a join reports as replaced (failing if there are none or several)."""
    assert len(result.replaced) == 1, result.replaced
    return result.replaced[0]


# --- joining and the JoinResult fields ----------------------------------------------------

def test_first_host_join_sees_an_empty_session() -> None:
    reg = make_registry()
    result = connect(reg, HOST, "h", "H")
    assert result.replaced == ()
    assert result.notify == ()
    assert result.present == ()
    assert result.host_present is False
    assert result.participant_count == 0
    assert result.member.role == HOST and result.member.peer_id == "h"
    assert result.member.conn == "H"
    session = session_of(reg)
    assert result.session is session
    assert session.host is result.member
    assert session.host_conns == ("H",)
    assert session.participant_conns == ()


def test_participant_join_is_told_about_the_host_and_the_host_about_it() -> None:
    reg = make_registry()
    host = connect(reg, HOST, "h", "H").member
    result = connect(reg, PARTICIPANT, "p1", "P1")
    assert result.notify == ("H",)
    assert result.present == (host,)
    assert result.host_present is True
    assert result.participant_count == 0  # the other participants, not counting itself
    second = connect(reg, PARTICIPANT, "p2", "P2")
    assert second.notify == ("H",)  # participants are not told about each other
    assert second.host_present is True
    assert second.participant_count == 1
    assert session_of(reg).participant_conns == ("P1", "P2")


def test_participant_joining_before_the_host_sees_no_host() -> None:
    reg = make_registry()
    result = connect(reg, PARTICIPANT, "p1", "P1")
    assert result.notify == ()
    assert result.present == ()
    assert result.host_present is False
    assert result.participant_count == 0
    assert session_of(reg).host_conns == ()
    assert session_of(reg).participant_conns == ("P1",)


def test_host_joining_late_is_told_about_every_participant() -> None:
    reg = make_registry()
    p1 = connect(reg, PARTICIPANT, "p1", "P1").member
    p2 = connect(reg, PARTICIPANT, "p2", "P2").member
    result = connect(reg, HOST, "h", "H")
    assert result.notify == ("P1", "P2")
    assert result.present == (p1, p2)
    assert result.host_present is False  # the host is the newcomer itself
    assert result.participant_count == 2


def test_counterparts_and_members() -> None:
    reg = make_registry()
    host = connect(reg, HOST, "h", "H").member
    p1 = connect(reg, PARTICIPANT, "p1", "P1").member
    session = session_of(reg)
    assert session.counterparts(HOST) == ("P1",)
    assert session.counterparts(PARTICIPANT) == ("H",)
    assert list(session.members()) == [host, p1]
    assert session.member_count == 2


def test_join_result_is_frozen() -> None:
    result = connect(make_registry(), HOST, "h", "H")
    with pytest.raises(FrozenInstanceError):
        result.notify = ()  # type: ignore[misc]


# --- replacement --------------------------------------------------------------------------

def test_second_host_replaces_the_first() -> None:
    reg = make_registry()
    old = connect(reg, HOST, "h-old", "H1").member
    connect(reg, PARTICIPANT, "p1", "P1")
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, HOST, "h-new", "H2")
    replaced = only_replaced(result)
    assert replaced.member is old
    assert replaced.notify == ("P1", "P2")  # peer_left for the old host
    assert result.notify == ("P1", "P2")  # peer_joined for the new one
    session = session_of(reg)
    assert session.host is result.member
    assert session.host_conns == ("H2",)
    assert session.member_count == 3


def test_host_reconnecting_with_the_same_peer_id_replaces_itself() -> None:
    reg = make_registry()
    old = connect(reg, HOST, "h", "H1").member
    connect(reg, PARTICIPANT, "p1", "P1")
    result = connect(reg, HOST, "h", "H2")
    replaced = only_replaced(result)
    assert replaced.member is old
    assert replaced.notify == ("P1",)
    assert session_of(reg).host_conns == ("H2",)


def test_participant_reconnecting_replaces_its_stale_connection() -> None:
    reg = make_registry()
    connect(reg, HOST, "h", "H")
    old = connect(reg, PARTICIPANT, "p1", "P1-old").member
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, PARTICIPANT, "p1", "P1-new")
    replaced = only_replaced(result)
    assert replaced.member is old
    assert replaced.notify == ("H",)
    assert result.notify == ("H",)
    assert result.participant_count == 1
    session = session_of(reg)
    assert set(session.participant_conns) == {"P1-new", "P2"}
    assert len(session.participants) == 2
    assert session.participants["p1"] is result.member


def test_participant_reconnecting_as_host_replaces_its_participant_connection() -> None:
    reg = make_registry()
    old = connect(reg, PARTICIPANT, "x", "X-as-participant").member
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, HOST, "x", "X-as-host")
    replaced = only_replaced(result)
    assert replaced.member is old
    assert replaced.notify == ()  # no host was there to be told a participant left
    assert result.notify == ("P2",)
    assert result.present == (session_of(reg).participants["p2"],)
    assert result.participant_count == 1
    session = session_of(reg)
    assert session.host is result.member
    assert session.participant_conns == ("P2",)
    assert "x" not in session.participants


def test_host_reconnecting_as_participant_replaces_its_host_connection() -> None:
    reg = make_registry()
    old = connect(reg, HOST, "x", "X-as-host").member
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, PARTICIPANT, "x", "X-as-participant")
    replaced = only_replaced(result)
    assert replaced.member is old
    assert replaced.notify == ("P2",)  # participants learn the host left
    assert result.notify == ()  # no host is left to tell about the newcomer
    assert result.present == ()
    assert result.host_present is False
    assert result.participant_count == 1
    session = session_of(reg)
    assert session.host is None
    assert session.host_conns == ()
    assert session.participant_conns == ("P2", "X-as-participant")


def test_participant_becoming_host_also_replaces_the_current_host() -> None:
    reg = make_registry()
    old_host = connect(reg, HOST, "h", "H").member
    old_participant = connect(reg, PARTICIPANT, "x", "X-as-participant").member
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, HOST, "x", "X-as-host")
    session = session_of(reg)
    assert session.host is result.member
    assert session.participant_conns == ("P2",)
    # Every member that is gone after the join must be reported, or its connection leaks.
    assert len(result.replaced) == 2
    by_member = {id(r.member): r for r in result.replaced}
    assert set(by_member) == {id(old_host), id(old_participant)}
    # The old host's participants (now only P2) learn it left; the old participant's
    # counterpart was that host, which is gone too, so nobody is told about it.
    assert by_member[id(old_host)].notify == ("P2",)
    assert by_member[id(old_participant)].notify == ()
    assert result.notify == ("P2",)  # peer_joined for the new host
    assert result.present == (session.participants["p2"],)
    assert result.participant_count == 1
    assert session.member_count == 2
    # Both displaced members are stale: their late leave changes nothing.
    assert reg.leave(session, old_host, now=1.0).notify == ()
    assert reg.leave(session, old_participant, now=1.0).notify == ()
    assert session.host is result.member and session.participant_conns == ("P2",)


def test_replaced_is_frozen() -> None:
    reg = make_registry()
    connect(reg, HOST, "h", "H1")
    replaced = only_replaced(connect(reg, HOST, "h", "H2"))
    with pytest.raises(FrozenInstanceError):
        replaced.notify = ()  # type: ignore[misc]


def test_replaced_member_leaving_does_not_remove_its_replacement() -> None:
    reg = make_registry()
    connect(reg, HOST, "h", "H")
    old = connect(reg, PARTICIPANT, "p1", "P1-old").member
    new = connect(reg, PARTICIPANT, "p1", "P1-new").member
    session = session_of(reg)
    left = reg.leave(session, old, now=1.0)
    assert left.member is old
    assert left.notify == ()
    assert session.participants["p1"] is new
    assert session.participant_conns == ("P1-new",)


def test_replaced_host_leaving_does_not_remove_the_new_host() -> None:
    reg = make_registry()
    old = connect(reg, HOST, "h", "H1").member
    connect(reg, PARTICIPANT, "p1", "P1")
    new = connect(reg, HOST, "h", "H2").member
    session = session_of(reg)
    assert reg.leave(session, old, now=1.0).notify == ()
    assert session.host is new
    assert session.host_conns == ("H2",)


def test_replaced_member_leaving_after_a_role_change_does_not_remove_the_new_member() -> None:
    reg = make_registry()
    old = connect(reg, HOST, "x", "X-as-host").member
    new = connect(reg, PARTICIPANT, "x", "X-as-participant").member
    session = session_of(reg)
    assert reg.leave(session, old, now=1.0).notify == ()
    assert session.participants["x"] is new
    assert session.member_count == 1


# --- leaving ------------------------------------------------------------------------------

def test_leave_notifies_the_counterparts_and_is_idempotent() -> None:
    reg = make_registry()
    host = connect(reg, HOST, "h", "H").member
    p1 = connect(reg, PARTICIPANT, "p1", "P1").member
    connect(reg, PARTICIPANT, "p2", "P2")
    session = session_of(reg)
    first = reg.leave(session, p1, now=1.0)
    assert first.member is p1
    assert first.notify == ("H",)
    assert session.participant_conns == ("P2",)
    again = reg.leave(session, p1, now=2.0)
    assert again.notify == ()
    assert session.participant_conns == ("P2",)
    gone_host = reg.leave(session, host, now=3.0)
    assert gone_host.notify == ("P2",)
    assert session.host is None
    assert session.host_conns == ()
    assert reg.leave(session, host, now=4.0).notify == ()


def test_last_participant_leaving_tells_the_host() -> None:
    reg = make_registry()
    connect(reg, HOST, "h", "H")
    p1 = connect(reg, PARTICIPANT, "p1", "P1").member
    session = session_of(reg)
    assert reg.leave(session, p1, now=1.0).notify == ("H",)
    assert session.participant_conns == ()
    assert session.empty_since is None  # the host is still there


# --- limits -------------------------------------------------------------------------------

def test_participant_past_the_limit_is_refused_without_changing_the_session() -> None:
    reg = make_registry(max_participants=2)
    connect(reg, HOST, "h", "H")
    connect(reg, PARTICIPANT, "p1", "P1")
    connect(reg, PARTICIPANT, "p2", "P2")
    session = reg.reserve(SID, 1.0)
    with pytest.raises(SessionFull):
        reg.join(session, PARTICIPANT, "p3", "P3")
    assert session.participant_conns == ("P1", "P2")
    assert session.host_conns == ("H",)
    assert session.reserved == 1  # join does not consume the reservation
    reg.release(session, 1.0)
    assert session.reserved == 0


def test_existing_participant_reconnecting_at_the_limit_is_allowed() -> None:
    reg = make_registry(max_participants=2)
    connect(reg, PARTICIPANT, "p1", "P1")
    old = connect(reg, PARTICIPANT, "p2", "P2-old").member
    result = connect(reg, PARTICIPANT, "p2", "P2-new")
    assert only_replaced(result).member is old
    assert set(session_of(reg).participant_conns) == {"P1", "P2-new"}


def test_host_joins_a_session_whose_participants_are_at_the_limit() -> None:
    reg = make_registry(max_participants=2)
    connect(reg, PARTICIPANT, "p1", "P1")
    connect(reg, PARTICIPANT, "p2", "P2")
    result = connect(reg, HOST, "h", "H")
    assert result.participant_count == 2
    assert session_of(reg).host_conns == ("H",)


def test_host_becoming_a_participant_at_the_limit_is_refused_and_stays_host() -> None:
    reg = make_registry(max_participants=2)
    host = connect(reg, HOST, "h", "H").member
    connect(reg, PARTICIPANT, "p1", "P1")
    connect(reg, PARTICIPANT, "p2", "P2")
    session = reg.reserve(SID, 1.0)
    with pytest.raises(SessionFull):
        reg.join(session, PARTICIPANT, "h", "H-as-participant")
    reg.release(session, 1.0)
    assert session.host is host
    assert session.host_conns == ("H",)
    assert session.participant_conns == ("P1", "P2")


def test_full_session_member_can_reconnect_with_one_spare_connection_slot() -> None:
    # host + max_participants members, plus one slot for a reconnect's handshake.
    reg = make_registry(max_participants=2, max_connections=4)
    connect(reg, HOST, "h", "H")
    connect(reg, PARTICIPANT, "p1", "P1")
    old = connect(reg, PARTICIPANT, "p2", "P2-old").member
    assert only_replaced(connect(reg, PARTICIPANT, "p2", "P2-new")).member is old
    assert connect(reg, HOST, "h", "H-new").member.conn == "H-new"


def test_reserve_counts_handshakes_and_members_against_the_connection_limit() -> None:
    reg = make_registry(max_participants=8, max_connections=3)
    first = reg.reserve(SID, 0.0)
    assert len(reg) == 1 and reg.get(SID) is first
    assert first.reserved == 1
    assert reg.reserve(SID, 0.0) is first
    assert reg.reserve(SID, 0.0) is first
    assert first.reserved == 3
    with pytest.raises(TooManyConnections):
        reg.reserve(SID, 0.0)
    assert first.reserved == 3  # a refused reserve counts nothing
    reg.release(first, 0.0)
    assert first.reserved == 2
    reg.join(first, HOST, "h", "H")  # joined under one of the two remaining reservations
    with pytest.raises(TooManyConnections):
        reg.reserve(SID, 0.0)  # 2 reserved + 1 member
    reg.release(first, 0.0)
    reg.release(first, 0.0)
    assert first.reserved == 0
    assert first.member_count == 1
    reg.reserve(SID, 0.0)
    reg.reserve(SID, 0.0)
    with pytest.raises(TooManyConnections):
        reg.reserve(SID, 0.0)


def test_connection_limit_is_per_session() -> None:
    reg = make_registry(max_connections=2)
    reg.reserve("a", 0.0)
    reg.reserve("a", 0.0)
    with pytest.raises(TooManyConnections):
        reg.reserve("a", 0.0)
    assert reg.reserve("b", 0.0).reserved == 1
    assert len(reg) == 2


# --- expiry -------------------------------------------------------------------------------

def test_empty_session_is_kept_for_the_grace_period_then_expired() -> None:
    reg = make_registry(grace_s=GRACE)
    host = connect(reg, HOST, "h", "H", now=50.0).member
    session = session_of(reg)
    assert reg.expire(10_000.0) == []  # a session with members never expires
    reg.leave(session, host, now=100.0)
    assert session.empty_since == 100.0
    assert reg.expire(100.0 + GRACE - 0.001) == []
    assert reg.get(SID) is session
    assert reg.expire(100.0 + GRACE) == [SID]
    assert reg.get(SID) is None
    assert len(reg) == 0
    assert reg.expire(1e9) == []


def test_session_reused_within_grace_is_not_expired() -> None:
    reg = make_registry(grace_s=GRACE)
    host = connect(reg, HOST, "h", "H", now=0.0).member
    session = session_of(reg)
    reg.leave(session, host, now=100.0)
    again = connect(reg, HOST, "h", "H2", now=105.0)
    assert again.session is session  # the reconnecting peer found the same session
    assert session.empty_since is None
    assert reg.expire(100.0 + GRACE) == []
    assert reg.expire(1e6) == []
    # Emptied again: the grace period starts over from the second emptying.
    reg.leave(session, again.member, now=108.0)
    assert reg.expire(108.0 + GRACE - 0.5) == []
    assert reg.expire(108.0 + GRACE) == [SID]


def test_pending_handshake_keeps_an_empty_session_alive() -> None:
    reg = make_registry(grace_s=GRACE)
    host = connect(reg, HOST, "h", "H", now=0.0).member
    session = session_of(reg)
    reg.leave(session, host, now=100.0)
    reg.reserve(SID, 105.0)
    assert session.empty_since is None
    assert reg.expire(1000.0) == []
    reg.release(session, 1000.0)  # the handshake failed: empty again from now on
    assert session.empty_since == 1000.0
    assert reg.expire(1000.0 + GRACE - 0.5) == []
    assert reg.expire(1000.0 + GRACE) == [SID]


def test_session_that_never_got_a_member_expires_after_its_handshake_ends() -> None:
    reg = make_registry(grace_s=GRACE)
    session = reg.reserve(SID, 0.0)
    assert reg.expire(1e6) == []
    reg.release(session, 3.0)
    assert reg.expire(3.0 + GRACE - 0.5) == []
    assert reg.expire(3.0 + GRACE) == [SID]


def test_refused_participant_leaves_an_empty_session_expirable() -> None:
    reg = make_registry(max_participants=1, grace_s=GRACE)
    p1 = connect(reg, PARTICIPANT, "p1", "P1", now=0.0).member
    session = session_of(reg)
    with pytest.raises(SessionFull):
        connect(reg, PARTICIPANT, "p2", "P2", now=1.0)
    assert session.reserved == 0
    reg.leave(session, p1, now=2.0)
    assert reg.expire(2.0 + GRACE) == [SID]


def test_expire_drops_only_the_sessions_past_their_grace() -> None:
    reg = make_registry(grace_s=GRACE)
    for i, sid in enumerate(("a", "b", "c")):
        member = connect(reg, HOST, "h", f"H{sid}", now=0.0, sid=sid).member
        reg.leave(session_of(reg, sid), member, now=float(i))
    connect(reg, HOST, "h", "Hd", now=0.0, sid="d")
    assert sorted(reg.expire(1.0 + GRACE)) == ["a", "b"]
    assert reg.get("c") is not None and reg.get("d") is not None
    assert reg.expire(2.0 + GRACE) == ["c"]
    assert reg.get("d") is not None


def test_zero_grace_expires_an_empty_session_at_once() -> None:
    reg = make_registry(grace_s=0.0)
    member = connect(reg, HOST, "h", "H", now=5.0).member
    reg.leave(session_of(reg), member, now=7.0)
    assert reg.expire(7.0) == [SID]


# --- stateful property test ---------------------------------------------------------------

SESSION_IDS = ("s0", "s1")
PEER_IDS = ("a", "b", "c", "d", "e")
MAX_PARTICIPANTS = 3
MAX_CONNECTIONS = 6
STATE_GRACE = 5.0


class RegistryMachine(RuleBasedStateMachine):
    """Random reserve/join/leave/release/expire sequences against a simple model.

    The model knows, per session, the outstanding reservations, the live members and
    since when the session has been empty; the invariants compare the registry with it.
    A join displaces the member with the same peer_id and, for a host join, the current
    host: both when a participant comes back as host while another host is present.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reg: Registry[int] = Registry(
            max_participants=MAX_PARTICIPANTS, max_connections_per_session=MAX_CONNECTIONS,
            grace_s=STATE_GRACE)
        self.now = 0.0
        self.next_conn = 0
        # Outstanding handshakes: [session id, Session, conn that joined under it or None].
        self.pending: list[list[Any]] = []
        # Live members: conn -> (session id, Member).
        self.live: dict[int, tuple[str, Member[int]]] = {}
        # Members that were replaced or left, with the Session object they belonged to.
        self.stale: list[tuple[Session[int], Member[int]]] = []
        self.empty_since: dict[str, float | None] = {}

    # model helpers
    def _reserved(self, sid: str) -> int:
        return sum(1 for p in self.pending if p[0] == sid)

    def _members(self, sid: str) -> list[Member[int]]:
        return [m for s, m in self.live.values() if s == sid]

    def _mark_if_empty(self, sid: str) -> None:
        if not self._members(sid) and not self._reserved(sid) \
                and self.empty_since.get(sid) is None:
            self.empty_since[sid] = self.now

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 7.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(sid=st.sampled_from(SESSION_IDS))
    def reserve(self, sid: str) -> None:
        if sid not in self.empty_since:
            self.empty_since[sid] = None
        if self._reserved(sid) + len(self._members(sid)) >= MAX_CONNECTIONS:
            with pytest.raises(TooManyConnections):
                self.reg.reserve(sid, self.now)
            return
        session = self.reg.reserve(sid, self.now)
        self.pending.append([sid, session, None])
        self.empty_since[sid] = None

    def _can_rejoin_as_host(self) -> bool:
        return any(p[2] is None and self._has_host_and_participant(p[0]) for p in self.pending)

    def _has_host_and_participant(self, sid: str) -> bool:
        roles = {m.role for m in self._members(sid)}
        return roles == {HOST, PARTICIPANT}

    @precondition(lambda self: any(p[2] is None for p in self.pending))
    @rule(data=st.data(), role=st.sampled_from([HOST, PARTICIPANT]),
          peer_id=st.sampled_from(PEER_IDS))
    def join(self, data: st.DataObject, role: Role, peer_id: str) -> None:
        slot = data.draw(st.sampled_from([p for p in self.pending if p[2] is None]))
        self._join(slot, role, peer_id)

    @precondition(_can_rejoin_as_host)
    @rule(data=st.data())
    def participant_rejoins_as_host(self, data: st.DataObject) -> None:
        """Steer towards the double replacement: a participant's peer_id joins as host."""
        slot = data.draw(st.sampled_from([p for p in self.pending if p[2] is None
                                          and self._has_host_and_participant(p[0])]))
        peer_id = data.draw(st.sampled_from(sorted(
            m.peer_id for m in self._members(slot[0]) if m.role == PARTICIPANT)))
        self._join(slot, HOST, peer_id)

    def _join(self, slot: list[Any], role: Role, peer_id: str) -> None:
        sid, session = slot[0], slot[1]
        members = self._members(sid)
        participants = [m for m in members if m.role == PARTICIPANT]
        # Displaced: the member with this peer_id, and the current host when a host joins.
        displaced = {id(m): m for m in members
                     if m.peer_id == peer_id or (role == HOST and m.role == HOST)}
        conn = self.next_conn
        self.next_conn += 1
        slot[2] = conn
        full = role == PARTICIPANT and len(participants) >= MAX_PARTICIPANTS and not any(
            m.role == PARTICIPANT for m in displaced.values())
        if full:
            with pytest.raises(SessionFull):
                self.reg.join(session, role, peer_id, conn)
            return
        result = self.reg.join(session, role, peer_id, conn)
        assert len(result.replaced) == len(displaced)
        assert {id(r.member) for r in result.replaced} == set(displaced)
        remaining = [m for m in members if id(m) not in displaced]
        for replaced in result.replaced:
            # peer_left goes to the displaced member's counterparts that stay in the session.
            expected_notify = {m.conn for m in remaining if m.role != replaced.member.role}
            assert set(replaced.notify) == expected_notify
            assert len(replaced.notify) == len(expected_notify)
            del self.live[replaced.member.conn]
            self.stale.append((session, replaced.member))
        self.live[conn] = (sid, result.member)
        others = [m for m in self._members(sid) if m.role != role]
        assert set(result.notify) == {m.conn for m in others}
        assert {id(m) for m in result.present} == {id(m) for m in others}
        assert result.host_present == (role == PARTICIPANT and bool(others))
        assert result.participant_count == sum(
            1 for m in self._members(sid) if m.role == PARTICIPANT and m.conn != conn)
        self.empty_since[sid] = None

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.pending))
        self.pending.remove(slot)
        self.reg.release(slot[1], self.now)
        self._mark_if_empty(slot[0])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.live)))
        sid, member = self.live.pop(conn)
        session = self.reg.get(sid)
        assert session is not None
        result = self.reg.leave(session, member, self.now)
        assert set(result.notify) == {m.conn for m in self._members(sid) if m.role != member.role}
        self.stale.append((session, member))
        self._mark_if_empty(sid)

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data())
    def leave_again(self, data: st.DataObject) -> None:
        session, member = data.draw(st.sampled_from(self.stale))
        assert self.reg.leave(session, member, self.now).notify == ()

    @rule()
    def expire(self) -> None:
        gone = self.reg.expire(self.now)
        expected = {sid for sid, since in self.empty_since.items()
                    if since is not None and self.now - since >= STATE_GRACE}
        assert set(gone) == expected
        for sid in gone:
            del self.empty_since[sid]

    @invariant()
    def registry_matches_the_model(self) -> None:
        assert set(self.reg.sessions) == set(self.empty_since)
        for sid, session in self.reg.sessions.items():
            assert session.session_id == sid
            assert session.reserved == self._reserved(sid) >= 0
            assert session.empty_since == self.empty_since[sid]
            members = self._members(sid)
            assert {id(m) for m in session.members()} == {id(m) for m in members}
            hosts = [m for m in members if m.role == HOST]
            assert len(hosts) <= 1
            assert len(session.participants) <= MAX_PARTICIPANTS
            # Each connection counts once: in its handshake, or as a member after it.
            handshaking = {p[2] for p in self.pending if p[0] == sid}
            connections = session.reserved + sum(
                1 for m in session.members() if m.conn not in handshaking)
            assert connections <= MAX_CONNECTIONS
            peer_ids = [m.peer_id for m in session.members()]
            assert len(peer_ids) == len(set(peer_ids))
            assert session.host_conns == (() if session.host is None else (session.host.conn,))
            assert session.host is None or session.host.role == HOST
            assert session.participant_conns == tuple(
                m.conn for m in session.participants.values())
            assert all(m.role == PARTICIPANT and m.peer_id == pid
                       for pid, m in session.participants.items())
            if session.empty_since is not None:
                assert session.member_count == 0 and session.reserved == 0
        for slot in self.pending:
            assert self.reg.sessions[slot[0]] is slot[1]


RegistryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestRegistryMachine = RegistryMachine.TestCase
