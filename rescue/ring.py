"""Which worker slot (or node) owns a session: rendezvous hashing.

Every owner candidate (a slot id, a node name) gets a 64-bit seed; a session's score
for a candidate is a 64-bit mix of the session's hash and the seed, and the highest
score wins (highest random weight, Thaler & Ravishankar 1996). Properties that follow:

- both peers of a session compute the same owner from the session id alone;
- adding or removing one of N candidates moves only the sessions that candidate wins
  or loses, about 1/N of them, and no session moves between two other candidates;
- the same function routes sessions to nodes (control-plane routing), over names.

Cost: one BLAKE2b of the session id plus a few integer operations per candidate;
candidates are few (workers per node, nodes per cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

_MASK = (1 << 64) - 1

K = TypeVar("K", bound=Hashable)


def key_hash(key: str) -> int:
    """Return the stable 64-bit hash of ``key`` (BLAKE2b-64 of its UTF-8 bytes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """SplitMix64's finalizer: a bijective 64-bit mix with good avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class Ring(Generic[K]):
    """A set of owner candidates and the rendezvous choice among them."""

    __slots__ = ("_seeded", "members")

    def __init__(self, members: Iterable[K]) -> None:
        self.members: tuple[K, ...] = tuple(dict.fromkeys(members))
        if not self.members:
            raise ValueError("a ring needs at least one member")
        self._seeded: Sequence[tuple[int, K]] = [
            (key_hash(f"{type(m).__name__}:{m}"), m) for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def owner(self, key: str) -> K:
        """Return the member that owns ``key``."""
        h = key_hash(key)
        best_score = -1
        best = self.members[0]
        for seed, member in self._seeded:
            score = _mix(h ^ seed)
            if score > best_score:
                best_score, best = score, member
        return best
