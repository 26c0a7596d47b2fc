"""The node registry's data: what each worker publishes about its node, how a reader folds
those records into one view per node, and which active node owns a session.

Layout in Redis (the adapter is :mod:`rescue.cluster.redis_registry`)::

    beach-rescue:cluster:nodes        SET  of node ids
    beach-rescue:cluster:node:<id>    HASH field ``w:<pid>`` per worker process = JSON
                                      :class:`WorkerRecord`; every write refreshes the
                                      key's TTL, so any live worker keeps its node listed

A node's state is the union of its workers' records: **active** if any record says
active (during a reload the new generation is active while the old one drains),
**draining** when every record says so (the node is stopping). A worker deletes its own
field on a clean exit, and Redis drops the key with its last field; a node that dies
leaves its key to expire. A record older than the node's newest record by more than
the TTL belongs to a worker that died while its siblings lived on: readers ignore it
and writers delete it. Both compare times written by the same node's clock, so clock
skew between machines does not matter.

Sans-I/O: no sockets here; times are parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from rescue.ring import Ring

KEY_PREFIX = "beach-rescue:cluster"
NODES_KEY = f"{KEY_PREFIX}:nodes"
NODE_KEY_PREFIX = f"{KEY_PREFIX}:node:"
ACTIVE: Literal["active"] = "active"
DRAINING: Literal["draining"] = "draining"
State = Literal["active", "draining"]


class RegistryUnavailable(Exception):
    """The registry could not be reached (or answered nonsense) in time."""


def node_key(node_id: str) -> str:
    """The Redis key of ``node_id``'s hash of worker records."""
    return NODE_KEY_PREFIX + node_id


def worker_field(pid: int) -> str:
    """The hash field of the worker process ``pid``."""
    return f"w:{pid}"


class WorkerRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """What one worker says about its node; ``at`` is the node's wall clock at writing."""

    url: str
    state: State
    connections: int
    sessions: int
    generation: int
    at: float


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerRecord)


def encode_record(record: WorkerRecord) -> bytes:
    """The record as stored in its hash field."""
    return _encoder.encode(record)


def decode_record(raw: bytes) -> WorkerRecord | None:
    """The record of a hash field, or None if it is not one (garbage is ignored)."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as readers see it: its URL, state and load summed over its workers."""

    node_id: str
    url: str
    state: State
    connections: int
    sessions: int
    workers: int

    @property
    def active(self) -> bool:
        """True if the node takes new sessions."""
        return self.state == ACTIVE


def stale_fields(fields: Mapping[bytes, bytes], now: float,
                 ttl_s: float) -> list[str]:
    """The fields a writer on this node should delete: garbage, or written over
    ``ttl_s`` before ``now`` (the writer's clock, the one that wrote them)."""
    out = []
    for name, raw in fields.items():
        record = decode_record(raw)
        if record is None or record.at < now - ttl_s:
            out.append(name.decode(errors="replace"))
    return out


def node_view(node_id: str, fields: Mapping[bytes, bytes],
              ttl_s: float) -> NodeView | None:
    """Fold a node's worker records into its view; None if no usable record is left."""
    records = [r for r in (decode_record(raw) for raw in fields.values()) if r is not None]
    if not records:
        return None
    newest = max(r.at for r in records)
    records = [r for r in records if r.at >= newest - ttl_s]
    active = [r for r in records if r.state == ACTIVE]
    # The URL of the newest generation that serves (a reload may have changed it).
    source = max(active or records, key=lambda r: (r.generation, r.at))
    return NodeView(node_id=node_id, url=source.url, state=ACTIVE if active else DRAINING,
                    connections=sum(r.connections for r in records),
                    sessions=sum(r.sessions for r in records), workers=len(records))


def node_views(raw: Mapping[str, Mapping[bytes, bytes]],
               ttl_s: float) -> list[NodeView]:
    """Views of every node in ``raw`` (node id → hash fields), sorted by node id."""
    views = (node_view(node_id, fields, ttl_s) for node_id, fields in raw.items())
    return sorted((v for v in views if v is not None), key=lambda v: v.node_id)


class Placement:
    """Which active node owns a session: rendezvous hashing over node ids (the hash the
    workers use over their slots), so every control plane with the same view agrees and
    a node leaving moves only the sessions it owned."""

    def __init__(self, views: Iterable[NodeView]) -> None:
        self.nodes = {v.node_id: v for v in views if v.active}
        self._ring: Ring[str] | None = Ring(sorted(self.nodes)) if self.nodes else None

    def owner(self, session_id: str) -> NodeView | None:
        """The active node that owns ``session_id``; None if no node is active."""
        if self._ring is None:
            return None
        return self.nodes[self._ring.owner(session_id)]


class Registry(Protocol):
    """The registry's storage. Every method may raise :class:`RegistryUnavailable`."""

    async def publish(self, node_id: str, field: str, record: bytes,
                      ttl_s: float) -> dict[bytes, bytes]:
        """Write ``field`` of ``node_id``, refresh the node's TTL and list it; return the
        node's fields after the write (so the writer can prune stale ones)."""
        ...

    async def prune(self, node_id: str, fields: list[str]) -> None:
        """Delete ``fields`` of ``node_id``."""
        ...

    async def withdraw(self, node_id: str, field: str) -> None:
        """Delete ``field``; the node is unlisted when it was its last one."""
        ...

    async def read(self) -> dict[str, dict[bytes, bytes]]:
        """Every listed node's fields (node id → field → record); unlists expired nodes."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
