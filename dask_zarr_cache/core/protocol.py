"""Messages between workers, the index and the scheduler, and their wire format.

Batches cross the wire as one pickled ``bytes`` object: distributed serializes list
elements one by one (~40 ms per 1000 keys) but one bytes frame in ~2 ms, and pickle
carries any key (tabs, newlines, unicode) unchanged.  Every sender and receiver of a
batch uses :func:`pack` and :func:`unpack`; the typed replies below are what they carry.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

__all__ = [
    "FETCH",
    "NOBODY",
    "PEER",
    "PENDING",
    "CommitReply",
    "DatasetObjects",
    "Decision",
    "EvictReply",
    "Item",
    "Payload",
    "ProveReply",
    "SyncReply",
    "Unreachable",
    "WriteReply",
    "pack",
    "unpack",
]

#: Object bytes as the cache hands them around: file reads are zero-copy memoryviews.
Payload = bytes | memoryview

#: Decision of an acquire: nobody holds the key; the asker fetches it.
FETCH = "fetch"
#: Decision: a peer holds the key; read it from that peer.
PEER = "peer"
#: Decision: a peer is fetching the key right now; ask it, it answers when done.
PENDING = "pending"


class Item(NamedTuple):
    """One cached object as its owner reports it.

    ``tag`` is a serial the owner gives each local copy, so a late "dropped" report about an
    older copy never removes a newer one.
    """

    key: str
    size: int
    tag: int


class DatasetObjects(NamedTuple):
    """A worker's reply to ``zarr_cache_dataset_objects``: a dataset's stored objects.

    ``objects`` maps each array path to ``{key: (cache key or None, size at the source)}``.
    """

    name: str
    objects: dict[str, dict[str, tuple[str | None, int]]]


class Decision(NamedTuple):
    """How a worker gets one key it missed: ``kind`` is FETCH, PEER or PENDING.

    ``address`` is the peer to ask (the asker itself for FETCH); ``reads``, for FETCH,
    how often the cluster asked for the key lately (for the fetcher's admission policy);
    ``claim``, for PENDING, which claim of that peer the asker was sent to (a peer that
    then says "missing" had that claim go stale, unless it renewed it since).
    """

    kind: str
    address: str
    reads: int = 0
    claim: int = 0


#: A peer that failed to serve a key, and the claim it was asked for (0: its copy).
Unreachable = tuple[str, int]
#: No peer failed.
NOBODY: Unreachable = ("", 0)


class CommitReply(NamedTuple):
    """Committed keys the index refused (the claim was lost): the worker deletes them."""

    rejected: list[str]


class EvictReply(NamedTuple):
    """A worker applied an eviction: its highest write applied without a gap, what it dropped."""

    applied: int
    objects: int
    nbytes: int


class ProveReply(NamedTuple):
    """A worker checked its files of an earlier cluster below a prefix against the source."""

    current: int  #: shown unchanged: served again
    stale: int  #: changed, or not shown current: deleted


class SyncReply(NamedTuple):
    """The scheduler's answer to a worker catching up on writes.

    ``invalidations`` is ``None`` when the history since the worker's sequence number is no
    longer kept (the worker then trusts none of its files).
    """

    epoch: bytes
    seq: int
    invalidations: list[tuple[int, list[str], list[str]]] | None


class WriteReply(NamedTuple):
    """A write (or a batch of writes) is applied: no worker serves the bytes it replaced.

    ``epoch`` and ``seq`` are its place in the scheduler's history; ``unreached`` the
    workers that did not confirm it (their leases ran out); ``contested`` the keys more
    than one write of its batch wrote (which of them reached the source last is unknown).
    """

    epoch: bytes
    seq: int
    unreached: list[str]
    contested: frozenset[str]


def pack(value: Any) -> bytes:
    """Encode a batch (lists, tuples, strings, numbers) as one bytes frame."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(frame: bytes) -> Any:
    """Inverse of :func:`pack` (frames come only from this library's own processes)."""
    return pickle.loads(frame)
