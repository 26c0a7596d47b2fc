"""Tests for rescue.ring: rendezvous hashing of session ids onto slots and nodes."""

from __future__ import annotations

import random
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.ring import Ring, key_hash

PROPERTY = settings(deadline=None, max_examples=200)

KEYS = 20_000
MAX_SLOTS = 16
REL_BOUND = 0.15
"""Allowed relative deviation of a share from its expectation (see the balance test)."""

SESSION_ALPHABET = string.ascii_letters + string.digits + "._-"

session_ids = st.text(SESSION_ALPHABET, min_size=1, max_size=40)
int_members = st.lists(st.integers(0, 1_000), min_size=1, max_size=20, unique=True)
name_members = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=12,
                        unique=True)


def random_session_ids(count: int, seed: int) -> list[str]:
    """Session ids shaped like real ones (protocol charset, 16 to 40 characters)."""
    rng = random.Random(seed)
    return ["".join(rng.choices(SESSION_ALPHABET, k=rng.randint(16, 40)))
            for _ in range(count)]


@pytest.fixture(scope="module")
def keys() -> list[str]:
    return random_session_ids(KEYS, seed=20240611)


@pytest.fixture(scope="module")
def owners_by_size(keys: list[str]) -> dict[int, list[int]]:
    """The owner of every key for rings over slots ``range(n)``, n in 1..MAX_SLOTS."""
    return {n: [Ring(range(n)).owner(k) for k in keys] for n in range(1, MAX_SLOTS + 1)}


# --- key_hash ----------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "expected"), [
    ("", 0xE4A6A0577479B2B4),
    ("session-0001", 0x1CFB16E4563CCDDB),
    ("héllo", 0x135DD36EC231AFCB),
])
def test_key_hash_is_pinned(key: str, expected: int) -> None:
    """Values computed once: any change of hash function (or of its encoding) shows here.

    Python's ``hash`` is salted per process, so a pinned value also proves the hash does
    not depend on the process that computes it.
    """
    assert key_hash(key) == expected


@given(key=st.text())
@PROPERTY
def test_key_hash_is_an_unsigned_64_bit_value(key: str) -> None:
    assert 0 <= key_hash(key) < 1 << 64


def test_owners_are_pinned() -> None:
    """Routing must not change between versions (nodes of a cluster compare owners)."""
    slots = Ring(range(8))
    assert [slots.owner(k) for k in ["a", "b", "c", "session-0001", "x.y-Z_9"]] == [
        4, 1, 0, 0, 2]
    nodes = Ring(["node-a", "node-b", "node-c"])
    assert [nodes.owner(k) for k in ["a", "b", "c", "session-0001", "x.y-Z_9"]] == [
        "node-c", "node-b", "node-c", "node-c", "node-a"]


# --- construction --------------------------------------------------------------------------
def test_an_empty_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Ring([])


def test_duplicate_members_count_once() -> None:
    ring = Ring([3, 1, 3, 2, 1])
    assert ring.members == (3, 1, 2)
    assert len(ring) == 3


def test_a_single_member_owns_everything() -> None:
    ring = Ring(["only"])
    assert {ring.owner(k) for k in random_session_ids(200, seed=1)} == {"only"}


def test_int_and_str_members_with_the_same_text_are_distinct() -> None:
    """Slot 1 and node "1" are different candidates with different seeds."""
    ring: Ring[int | str] = Ring([1, "1"])
    owners = Counter(ring.owner(k) for k in random_session_ids(2_000, seed=2))
    assert set(owners) == {1, "1"}


# --- properties ----------------------------------------------------------------------------
@given(members=int_members, key=session_ids, seed=st.integers(0, 2**32))
@PROPERTY
def test_owner_is_a_member_and_ignores_member_order(members: list[int], key: str,
                                                     seed: int) -> None:
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    owner = Ring(members).owner(key)
    assert owner in members
    assert Ring(shuffled).owner(key) == owner
    assert Ring(members).owner(key) == owner  # deterministic across instances


@given(members=name_members, key=st.text(max_size=60), seed=st.integers(0, 2**32))
@PROPERTY
def test_string_members_route_like_int_members(members: list[str], key: str,
                                               seed: int) -> None:
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    owner = Ring(members).owner(key)
    assert owner in members
    assert Ring(shuffled).owner(key) == owner


@given(members=int_members, new=st.integers(1_001, 2_000),
       keys=st.lists(session_ids, min_size=1, max_size=50))
@PROPERTY
def test_adding_a_member_moves_keys_only_to_it(members: list[int], new: int,
                                               keys: list[str]) -> None:
    before, after = Ring(members), Ring([*members, new])
    for key in keys:
        assert after.owner(key) in (before.owner(key), new)


@given(members=st.lists(st.integers(0, 1_000), min_size=2, max_size=20, unique=True),
       data=st.data(), keys=st.lists(session_ids, min_size=1, max_size=50))
@PROPERTY
def test_removing_a_member_moves_only_its_keys(members: list[int], data: st.DataObject,
                                               keys: list[str]) -> None:
    gone = data.draw(st.sampled_from(members))
    before, after = Ring(members), Ring([m for m in members if m != gone])
    for key in keys:
        if before.owner(key) != gone:
            assert after.owner(key) == before.owner(key)
        else:
            assert after.owner(key) != gone


@given(members=name_members, keys=st.lists(st.text(max_size=30), min_size=1, max_size=30),
       data=st.data())
@PROPERTY
def test_node_names_move_minimally_too(members: list[str], keys: list[str],
                                       data: st.DataObject) -> None:
    new = data.draw(st.text(min_size=1, max_size=20).filter(lambda m: m not in members))
    before, after = Ring(members), Ring([*members, new])
    for key in keys:
        assert after.owner(key) in (before.owner(key), new)


# --- statistics on 20,000 session ids ---------------------------------------------------------
def test_every_slot_gets_its_share(owners_by_size: dict[int, list[int]]) -> None:
    """For N in 1..16 slots, every slot's share of 20,000 ids is within ±15% of 1/N.

    Bound: a slot's count is Binomial(K, 1/N), relative standard deviation
    sqrt((N - 1) / K) <= sqrt(15 / 20000) = 2.7% at N = 16, so ±15% is more than 5.4
    standard deviations: the chance that any of the 136 (N, slot) shares of a random key
    set falls outside is below 1e-5. The key set is seeded, so the test is deterministic.
    """
    for n in range(1, MAX_SLOTS + 1):
        counts = Counter(owners_by_size[n])
        assert set(counts) == set(range(n)), n
        expected = KEYS / n
        for slot in range(n):
            assert abs(counts[slot] - expected) <= REL_BOUND * expected, (n, slot, counts)


def test_growing_by_one_slot_moves_about_one_share(
        owners_by_size: dict[int, list[int]]) -> None:
    """Going from N to N+1 slots (N in 1..15) moves keys only to slot N, about K/(N+1).

    The moved count is Binomial(K, 1/(N+1)); the same ±15% relative bound as the balance
    test holds by the same argument (more than 5.4 standard deviations).
    """
    for n in range(1, MAX_SLOTS):
        before, after = owners_by_size[n], owners_by_size[n + 1]
        moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
        assert all(a == n for _, a in moved), n
        expected = KEYS / (n + 1)
        assert abs(len(moved) - expected) <= REL_BOUND * expected, (n, len(moved))
        # ... and the new slot takes evenly from every old slot
        if n > 1:
            taken = Counter(b for b, _ in moved)
            assert set(taken) == set(range(n)), n


def test_removing_a_middle_slot_moves_only_its_keys(keys: list[str],
                                                    owners_by_size: dict[int, list[int]]
                                                    ) -> None:
    before = owners_by_size[8]
    after = [Ring([0, 1, 2, 4, 5, 6, 7]).owner(k) for k in keys]
    for b, a in zip(before, after, strict=True):
        assert a == b if b != 3 else a != 3
    spread = Counter(a for b, a in zip(before, after, strict=True) if b == 3)
    assert set(spread) == {0, 1, 2, 4, 5, 6, 7}


def test_node_names_are_balanced(keys: list[str]) -> None:
    """Eight nodes by name share 20,000 ids within ±15% each (same bound as for slots)."""
    nodes = [f"rescue-{region}-{i}" for region in ("eu", "us") for i in range(4)]
    ring = Ring(nodes)
    counts = Counter(ring.owner(k) for k in keys)
    expected = KEYS / len(nodes)
    for node in nodes:
        assert abs(counts[node] - expected) <= REL_BOUND * expected, counts
