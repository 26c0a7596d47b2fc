"""Tests for rescue.cluster.registry: records, node views, staleness, placement."""

from __future__ import annotations

import uuid
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from rescue.cluster.registry import (
    ACTIVE,
    DRAINING,
    NodeView,
    Placement,
    State,
    WorkerRecord,
    decode_record,
    encode_record,
    node_key,
    node_view,
    node_views,
    stale_fields,
    worker_field,
)
from rescue.ring import Ring

TTL = 10.0


def record(state: State = ACTIVE, *, at: float = 1000.0, url: str = "ws://a/ws",
           connections: int = 1, sessions: int = 1, generation: int = 1) -> bytes:
    return encode_record(WorkerRecord(url=url, state=state, connections=connections,
                                      sessions=sessions, generation=generation, at=at))


def view(node_id: str, state: State = ACTIVE) -> NodeView:
    return NodeView(node_id=node_id, url=f"ws://{node_id}/ws", state=state, connections=0,
                    sessions=0, workers=1)


def test_keys_and_fields_are_namespaced() -> None:
    assert node_key("n1") == "beach-rescue:cluster:node:n1"
    assert worker_field(4242) == "w:4242"


def test_record_round_trips_and_garbage_decodes_to_none() -> None:
    rec = WorkerRecord(url="wss://r/ws", state=DRAINING, connections=3, sessions=2,
                       generation=4, at=12.5)
    assert decode_record(encode_record(rec)) == rec
    for junk in (b"", b"{", b"[]", b'{"url": 1}', record()[:-1],
                 record().replace(b'"active"', b'"sleeping"')):
        assert decode_record(junk) is None, junk


def test_a_record_with_unknown_extra_fields_still_decodes() -> None:
    raw = record()[:-1] + b',"weight":3}'  # a newer writer's field
    decoded = decode_record(raw)
    assert decoded is not None and decoded.state == ACTIVE


def test_node_is_active_while_any_worker_is_active() -> None:
    # A reload: the old generation drains while the new one serves.
    fields = {b"w:1": record(DRAINING, generation=1, url="ws://old/ws", connections=5),
              b"w:2": record(ACTIVE, generation=2, url="ws://new/ws", connections=1)}
    v = node_view("n", fields, TTL)
    assert v == NodeView(node_id="n", url="ws://new/ws", state=ACTIVE, connections=6,
                         sessions=2, workers=2)
    assert v.active


def test_node_is_draining_when_every_worker_drains() -> None:
    fields = {b"w:1": record(DRAINING), b"w:2": record(DRAINING, at=1001.0)}
    v = node_view("n", fields, TTL)
    assert v is not None and v.state == DRAINING and not v.active


def test_records_far_older_than_the_newest_are_ignored() -> None:
    # Worker 1 died 30 s ago while worker 2 kept refreshing: its record must not keep
    # the node active, nor count its load.
    fields = {b"w:1": record(ACTIVE, at=970.0, connections=100),
              b"w:2": record(DRAINING, at=1000.0, connections=2)}
    v = node_view("n", fields, TTL)
    assert v is not None and v.state == DRAINING and v.connections == 2 and v.workers == 1


def test_a_node_without_a_usable_record_has_no_view() -> None:
    assert node_view("n", {}, TTL) is None
    assert node_view("n", {b"w:1": b"garbage"}, TTL) is None


def test_node_views_are_sorted_and_skip_empty_nodes() -> None:
    raw = {"b": {b"w:1": record()}, "a": {b"w:1": record()}, "c": {b"w:9": b"junk"}}
    assert [v.node_id for v in node_views(raw, TTL)] == ["a", "b"]


def test_stale_fields_are_garbage_and_records_older_than_the_ttl() -> None:
    fields = {b"w:1": record(at=100.0), b"w:2": record(at=95.0), b"w:3": b"junk",
              b"w:4": record(at=89.9)}
    assert sorted(stale_fields(fields, now=100.0, ttl_s=10.0)) == ["w:3", "w:4"]


def test_placement_is_the_rendezvous_ring_over_active_node_ids() -> None:
    views = [view("n3"), view("n1"), view("n2", DRAINING), view("n4")]
    placement = Placement(views)
    ring = Ring(["n1", "n3", "n4"])
    for i in range(200):
        sid = f"s-{i}"
        owner = placement.owner(sid)
        assert owner is not None and owner.node_id == ring.owner(sid)
        assert owner.node_id != "n2"


def test_placement_without_an_active_node_owns_nothing() -> None:
    assert Placement([]).owner("s") is None
    assert Placement([view("n1", DRAINING)]).owner("s") is None


def test_placement_spreads_sessions_evenly() -> None:
    placement = Placement([view(f"node-{i}") for i in range(3)])
    counts = Counter()
    for _ in range(3000):
        owner = placement.owner(uuid.uuid4().hex)
        assert owner is not None
        counts[owner.node_id] += 1
    # 1000 expected each; binomial sd ~26, so +-15 % is over 5 sd.
    assert all(850 <= n <= 1150 for n in counts.values()), counts


@given(st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=2, max_size=6,
                unique=True),
       st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50))
def test_a_node_leaving_moves_only_its_own_sessions(nodes: list[str],
                                                     sessions: list[str]) -> None:
    before = Placement([view(n) for n in nodes])
    leaving = nodes[0]
    after = Placement([view(n, DRAINING if n == leaving else ACTIVE) for n in nodes])
    for sid in sessions:
        old, new = before.owner(sid), after.owner(sid)
        assert old is not None and new is not None
        if old.node_id != leaving:
            assert new.node_id == old.node_id
        else:
            assert new.node_id != leaving
