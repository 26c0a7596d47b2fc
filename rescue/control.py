"""Messages on the control channel between the supervisor and one worker.

One ``SOCK_SEQPACKET`` socketpair per worker process carries one JSON message per
packet. Worker to supervisor: :class:`Ready` once its machinery is up, :class:`Beat`
every second from the event loop (liveness and stats), :class:`IntakeStopped` when it
no longer accepts or adopts connections. Supervisor to worker: :class:`Serve` (start
intake), :class:`Drain` (stop intake, move peers away, exit), :class:`Stop` (close
everything now and exit), :class:`Cluster` (every worker's latest numbers).
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_PACKET = 65536


class Ready(msgspec.Struct, tag="ready"):
    """The worker is ready to serve when told to."""


class Beat(msgspec.Struct, tag="beat"):
    """A liveness beat with the worker's live numbers."""

    stats: dict[str, Any] = {}


class IntakeStopped(msgspec.Struct, tag="intake_stopped"):
    """The worker accepts and adopts no more connections."""


class Serve(msgspec.Struct, tag="serve"):
    """Start accepting on the slot's listener and adopting hand-offs."""


class Drain(msgspec.Struct, tag="drain"):
    """Stop intake, tell peers to reconnect over ``window_s``, exit by ``deadline_s``.

    ``final`` is set when the whole node stops (SIGTERM to the supervisor): the node then
    leaves the cluster (registry ``draining``, ``/readyz`` 503). A reload's drain leaves it
    in, since the new generation serves on.
    """

    window_s: float
    deadline_s: float
    final: bool = False


class Stop(msgspec.Struct, tag="stop"):
    """Close every connection now (GOING_AWAY) and exit."""


class Cluster(msgspec.Struct, tag="cluster"):
    """The supervisor's view of every worker (for ``/debug/stats`` on any worker)."""

    workers: list[dict[str, Any]]


Message = Ready | Beat | IntakeStopped | Serve | Drain | Stop | Cluster

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    """Encode one control message as one packet."""
    return _encoder.encode(message)


def decode(packet: bytes) -> Message:
    """Decode one packet; raises ``msgspec.DecodeError`` on anything else."""
    message: Message = _decoder.decode(packet)
    return message
