"""The cluster's write history: what every worker must drop, and since when.

The scheduler numbers every write made through a ``ClusterCacheStore`` (``seq`` 1, 2, ...)
and keeps the recent ones in an :class:`InvalidationLog`.  Workers remember the highest
``seq`` they have applied and stamp each cache file with it, so a worker that was away
(restarted, partitioned) learns exactly which of its files a later write replaced.  The
``epoch`` names one scheduler's history: files from another epoch cannot be proven
current and are never served.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from dask_zarr_cache.identity.keys import base_key

if TYPE_CHECKING:
    from collections.abc import Iterable


__all__ = ["Invalidation", "InvalidationLog", "matcher", "verify_files"]


def matcher(keys: Iterable[str], prefixes: Iterable[str]):
    """Return a predicate: does a cache key fall under these written keys or prefixes.

    ``keys`` are whole-object cache keys (a write drops every byte range of the object too).
    """
    bases = frozenset(keys)
    starts = tuple(prefixes)

    def matches(key: str) -> bool:
        return base_key(key) in bases or (bool(starts) and key.startswith(starts))

    return matches


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One write: its sequence number and the cache keys and key prefixes it replaced."""

    seq: int
    keys: tuple[str, ...]
    prefixes: tuple[str, ...]

    def as_message(self) -> tuple[int, list[str], list[str]]:
        """The wire form (see :class:`~dask_zarr_cache.core.protocol.SyncReply`)."""
        return self.seq, list(self.keys), list(self.prefixes)


class InvalidationLog:
    """The recent writes of one scheduler, bounded by the number of keys they name.

    Parameters
    ----------
    max_keys : int
        Keys (and prefixes) kept in all; older writes are forgotten first.  A worker whose
        applied ``seq`` is older than what is kept must distrust all of its files.

    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self.epoch = uuid.uuid4().bytes
        self.seq = 0
        self.max_keys = max_keys
        self._entries: deque[Invalidation] = deque()
        self._size = 0
        #: Every write with ``seq > floor`` is still in the log.
        self.floor = 0

    def append(self, keys: Iterable[str], prefixes: Iterable[str]) -> Invalidation:
        """Record a write and return it with its new sequence number."""
        self.seq += 1
        entry = Invalidation(self.seq, tuple(keys), tuple(prefixes))
        self._entries.append(entry)
        self._size += len(entry.keys) + len(entry.prefixes)
        while self._size > self.max_keys and len(self._entries) > 1:
            old = self._entries.popleft()
            self._size -= len(old.keys) + len(old.prefixes)
            self.floor = old.seq
        return entry

    def since(self, seq: int) -> list[Invalidation] | None:
        """Writes after ``seq``; ``None`` if some of them are no longer kept."""
        if seq < self.floor:
            return None
        if seq >= self.seq:
            return []
        return [e for e in self._entries if e.seq > seq]

    def catch_up(
        self, epoch: bytes | None, seq: int
    ) -> tuple[list[tuple[int, list[str], list[str]]] | None, int]:
        """What a worker at position ``(epoch, seq)`` must apply, and what it has applied.

        Returns the writes after ``seq`` as messages (``None``: it must drop every file,
        their history is lost or another scheduler's) and the sequence number the worker
        has applied, which counts as its acknowledgement.
        """
        if epoch == self.epoch:
            history = self.since(seq)
            return (None if history is None else [e.as_message() for e in history]), seq
        if epoch is None and seq == 0:  # a new worker without files: nothing to drop
            return [], self.seq
        return None, 0  # files from another scheduler's history: nothing of theirs is provable


class Stamped(Protocol):
    """A cache file as the write history judges it: its key and where it was read."""

    @property
    def key(self) -> str: ...
    @property
    def epoch(self) -> bytes: ...
    @property
    def seq(self) -> int: ...


F = TypeVar("F", bound=Stamped)


def verify_files(
    files: Iterable[F],
    epoch: bytes,
    history: list[tuple[int, list[str], list[str]]] | None,
) -> tuple[list[F], list[F], list[str]]:
    """Split files found on disk by what the write history says of them.

    Returns the files still current, those it cannot vouch for, and the keys of the
    stale ones.  A file is current if it was written under ``epoch`` and no write in
    ``history`` (the writes since the oldest file's sequence number; ``None`` if lost)
    after the file's own sequence number touched its key, and stale if one did.  The
    history cannot vouch for a file of another epoch (another scheduler's), or when it is
    lost: only the source can say whether such a file is current.
    """
    good, unknown, stale = [], [], []
    checks = [] if history is None else [(s, matcher(k, p)) for s, k, p in history]
    for f in files:
        if f.epoch != epoch or history is None:
            unknown.append(f)
        elif any(s > f.seq and matches(f.key) for s, matches in checks):
            stale.append(f.key)
        else:
            good.append(f)
    return good, unknown, stale
