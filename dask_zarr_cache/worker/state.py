"""A worker's bookkeeping of its cache, without I/O: entries, fetches, writes seen, peers.

:class:`LocalState` is shared by the task threads, zarr's event loop and the worker's
event loop of one worker, so every method takes its lock and none blocks.  Whatever needs
a disk or a network (delete a file, tell the index) is returned to the caller, the I/O
shell in :mod:`dask_zarr_cache.worker.cache`.  Time comes from an injected clock, so unit tests
drive TTL, leases and peer back-off without waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dask_zarr_cache.core.protocol import Item
from dask_zarr_cache.identity.keys import base_key, is_immutable
from dask_zarr_cache.worker.budget import Budget
from dask_zarr_cache.worker.counters import CacheCounters
from dask_zarr_cache.writes.log import matcher
from dask_zarr_cache.writes.marks import UNSEQUENCED, WriteMarks

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dask_zarr_cache.worker.disk import CacheFile

__all__ = ["Fetch", "LocalEntry", "LocalState", "Payload"]

#: Object bytes as the cache hands them around: file reads are zero-copy memoryviews.
Payload = bytes | memoryview

#: How many "which peer served this key" hints a worker keeps (oldest dropped first).
MAX_OWNER_HINTS = 200_000
#: Seconds a peer that failed to answer is not asked again.
PEER_BACKOFF = 30.0

_tags = itertools.count(1)


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """One object on this worker's disk."""

    size: int
    checksum: int
    created: float  #: clock time of the source read (TTL counts from here)
    tag: int = field(default_factory=lambda: next(_tags))

    def item(self, key: str) -> Item:
        """How the index knows this copy."""
        return Item(key, self.size, self.tag)


class Fetch:
    """One in-flight load of a key on this worker; its readers wait on :attr:`future`.

    A write of the key while it loads *poisons* it: the bytes still reach the readers that
    were already waiting (they started before the write returned), but are not cached, and
    readers that start later do not join it.
    """

    __slots__ = ("future", "poisoned", "seq")

    def __init__(self, seq: int) -> None:
        self.future: concurrent.futures.Future[Payload | None] = concurrent.futures.Future()
        self.poisoned = False
        #: Writes known to this worker when the load started (stamped on the file).
        self.seq = seq

    async def outcome(self) -> Payload | None:
        """Wait for the load's bytes (or its error) on the running event loop.

        A waiter that gives up (its task cancelled, a peer's wait timed out) leaves the
        load alone: cancelling a bare ``wrap_future`` would cancel :attr:`future` itself,
        and the leader and every other waiter would fail.
        """
        return await asyncio.shield(asyncio.wrap_future(self.future))


class LocalState:
    """Entries, budget, single-flight, write history and peer knowledge of one worker.

    Parameters
    ----------
    max_age_seconds : float or None
        TTL of entries.
    lease : float
        Seconds after the last successful catch-up with the scheduler's write history
        during which this worker may serve its files (see :meth:`can_serve`).
    clock : callable
        Seconds, wall-clock-like (file times are compared with it after a restart).
    capacity : int
        Bytes of objects this worker may keep (:class:`~dask_zarr_cache.worker.budget.Budget`).
    policy : {"tinylfu", "lru"}
        Which objects stay when the budget is full.

    """

    def __init__(
        self,
        max_age_seconds: float | None,
        lease: float,
        clock: Callable[[], float] = time.time,
        capacity: int = 0,
        policy: str = "tinylfu",
    ) -> None:
        self.max_age_seconds = max_age_seconds
        self.lease = lease
        self.clock = clock
        self.counters = CacheCounters(capacity=capacity)
        self.lock = threading.Lock()
        self.entries: dict[str, LocalEntry] = {}
        # Entries a TTL applies to (not a snapshot's), in creation order: the TTL sweep
        # walks it from the front.
        self._mortal: dict[str, None] = {}
        self._ranges: dict[str, set[str]] = {}  # byte-range entries by whole-object key
        self._inflight: dict[str, Fetch] = {}
        self.budget = Budget(capacity, policy)
        self._dropped: dict[str, Item] = {}
        # Which peer served a key last: warm reads skip the index. A wrong hint costs one
        # "missing" answer, never wrong bytes (peers serve only what they hold, verified).
        self._owner_hints: dict[str, str] = {}
        self._failed_peers: dict[str, float] = {}
        # Write history (see _invalidation): whose history, how far applied, when renewed.
        self.epoch: bytes | None = None
        self.applied_seq = 0  # every write up to here is applied
        self._applied_above: set[int] = set()  # writes applied beyond a gap
        self._synced_at: float | None = None
        self.marks = WriteMarks()  # which writes replaced which keys (for peers' bytes)
        # Files found on disk at start, not served until the write history clears them.
        self.unverified: dict[str, CacheFile] = {}

    # -- serving -------------------------------------------------------------------------
    def can_serve(self) -> bool:
        """Whether this worker's files may be served.

        They may while it caught up with the write history within ``lease`` seconds: a
        write it did not confirm waits that long before it returns.
        """
        with self.lock:
            return self._synced_at is not None and self.clock() - self._synced_at < self.lease

    def lookup(self, key: str) -> tuple[LocalEntry | None, bool]:
        """The live entry of ``key``, and whether it just expired (its file must go)."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or not self._is_expired(key, entry):
                return entry, False
        return None, bool(self.remove([key], expired=True))

    def record_hit(self, key: str, nbytes: int) -> None:
        """Count a read served from this worker's disk (an access, for the budget)."""
        with self.lock:
            self.counters.hits += 1
            self.counters.hit_bytes += nbytes
            self.budget.touch(key)

    def record_served(self, key: str, nbytes: int) -> None:
        """Count bytes of ``key`` served to a peer (an access, for the budget)."""
        with self.lock:
            self.counters.peer_served += 1
            self.counters.peer_served_bytes += nbytes
            self.budget.touch(key)

    def count(self, **increments: int) -> None:
        """Add to counters, e.g. ``count(remote_reads=1, remote_bytes=n)``."""
        with self.lock:
            for name, n in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + n)

    # -- single-flight -------------------------------------------------------------------
    def begin_fetch(self, key: str) -> tuple[Fetch, bool]:
        """The in-flight load of ``key`` and whether the caller leads it (must load)."""
        with self.lock:
            fetch = self._inflight.get(key)
            if fetch is not None:
                return fetch, False
            fetch = self._inflight[key] = Fetch(self.applied_seq)
            self.counters.misses += 1
            return fetch, True

    def inflight(self, key: str) -> Fetch | None:
        """The load of ``key`` that new readers would join, if any."""
        with self.lock:
            return self._inflight.get(key)

    def pending_fetches(self) -> list[concurrent.futures.Future[Payload | None]]:
        """Futures of every load in flight."""
        with self.lock:
            return [f.future for f in self._inflight.values()]

    def end_fetch(self, key: str, fetch: Fetch) -> None:
        """The leader is done with ``fetch`` (however it ended)."""
        with self.lock:
            if self._inflight.get(key) is fetch:
                del self._inflight[key]

    def superseded(self, key: str, fetch: Fetch) -> bool:
        """Whether a newer load or copy of ``key`` replaced ``fetch`` here (a write came).

        The index knows claims by worker, so the cluster-wide claim is then the newer
        load's: giving it up for ``fetch`` would take it from the newer one.
        """
        with self.lock:
            current = self._inflight.get(key)
            return (current is not None and current is not fetch) or key in self.entries

    def admit(
        self, key: str, entry: LocalEntry, fetch: Fetch, reads: int = 0
    ) -> tuple[bool, list[str]]:
        """Add the entry a fetch wrote, unless a write poisoned the fetch meanwhile.

        ``reads`` is how often the cluster asked for ``key`` lately (from the index).
        Returns whether the entry stays, and the keys whose files must go: evicted to
        stay within the budget, and ``key`` itself unless it stays.
        """
        with self.lock:
            if fetch.poisoned:
                return False, [key]
            self.budget.record(key, reads)
            self._add(key, entry)
            evicted = self.budget.admit(key, entry.size)
        return key not in evicted, self.remove(evicted, evicted=True)

    def adopt(self, files: Iterable[CacheFile]) -> list[str]:
        """Add files found on disk (oldest first), verified against the write history.

        Returns the keys of the oldest files beyond the budget: they must go.
        """
        evicted = []
        with self.lock:
            for f in sorted(files, key=lambda f: f.mtime):
                self._add(f.key, LocalEntry(f.size, f.checksum, f.mtime))
                evicted += self.budget.add(f.key, f.size)
        return self.remove(evicted, evicted=True)

    # -- writes --------------------------------------------------------------------------
    def invalidate(
        self, keys: Iterable[str], prefixes: Iterable[str], seq: int = UNSEQUENCED
    ) -> list[str]:
        """Apply write ``seq``: poison and detach matching loads, drop matching entries.

        ``seq`` is :data:`UNSEQUENCED` for this worker's own write applied before the
        scheduler numbered it (see :meth:`numbered`).  Returns the keys whose files must
        be deleted.
        """
        keys, prefixes = list(keys), tuple(prefixes)
        matches = matcher(keys, prefixes)
        with self.lock:
            self.marks.mark(seq, keys, prefixes)
            for key in [k for k in self._inflight if matches(k)]:  # few: loads in flight
                self._inflight.pop(key).poisoned = True
            unverified = [k for k in self.unverified if matches(k)]  # only before a sync
            for key in unverified:
                del self.unverified[key]
            # Entries can be millions: look written keys up, scan only for prefixes.
            doomed = [k for key in keys for k in (key, *self._ranges.get(key, ()))]
            if prefixes:
                doomed += [k for k in self.entries if k.startswith(prefixes)]
        return unverified + self.remove(doomed)

    def numbered(self, keys: Iterable[str], prefixes: Iterable[str], seq: int) -> None:
        """Number this worker's own write, applied before it had a number, ``seq``."""
        with self.lock:
            self.marks.numbered(keys, prefixes, seq)

    def synced(self, epoch: bytes, seq: int, sent_at: float) -> None:
        """Record a catch-up with the scheduler sent at ``sent_at``.

        The writes it brought are applied first; under a new epoch, after
        :meth:`forget_all`: the new history's position replaces the old one.
        """
        with self.lock:
            same = epoch == self.epoch
            self.applied_seq = max(seq, self.applied_seq) if same else seq
            self._applied_above = {s for s in self._applied_above if s > self.applied_seq}
            self._advance()
            self.epoch = epoch
            self._synced_at = sent_at

    def sync_position(self) -> tuple[bytes | None, int]:
        """Where this worker's history stands; before the first sync, its oldest file's."""
        with self.lock:
            if self.epoch is not None or not self.unverified:
                return self.epoch, self.applied_seq
            oldest = min(self.unverified.values(), key=lambda f: f.seq)
            return oldest.epoch, oldest.seq

    def applied(self, seq: int) -> None:
        """A pushed write ``seq`` was applied (pushes may arrive out of order)."""
        with self.lock:
            if seq > self.applied_seq:
                self._applied_above.add(seq)
                self._advance()

    def position(self) -> tuple[bytes | None, int]:
        """Whose history, and up to which write every write is applied here.

        A file this worker serves is current up to this position: a write up to it that
        replaced the file's key deleted the file first.
        """
        with self.lock:
            return self.epoch, self.applied_seq

    def current(self, key: str, epoch: object, seq: object) -> bool:
        """Whether bytes of ``key`` a peer served at position ``(epoch, seq)`` are current.

        They are if the peer had applied every write this worker applied to ``key``: a
        write's invalidation may reach the peer after it reached this worker.
        """
        with self.lock:
            if epoch != self.epoch or not isinstance(seq, int):
                return False
            return seq >= self.marks.needed(key)

    def forget_all(self, seq: int) -> list[str]:
        """Distrust every file (the write history up to ``seq`` was lost); keys to delete.

        Peers' bytes are trusted again from their position ``seq`` on.
        """
        with self.lock:
            self.marks = WriteMarks()
            self.marks.floor = seq
            unverified = list(self.unverified)
            self.unverified.clear()
            for fetch in self._inflight.values():
                fetch.poisoned = True
            keys = list(self.entries)
        return unverified + self.remove(keys)

    # -- removal -------------------------------------------------------------------------
    def remove(
        self, keys: Iterable[str], *, evicted: bool = False, expired: bool = False
    ) -> list[str]:
        """Forget entries; returns those that were (their files must go, the index is told)."""
        removed = []
        with self.lock:
            for key in keys:
                entry = self.entries.pop(key, None)
                if entry is None:
                    continue
                removed.append(key)
                self._mortal.pop(key, None)
                self._unlink_range(key)
                self.budget.remove(key)
                self.counters.bytes -= entry.size
                self.counters.evictions += evicted
                self.counters.expired += expired
                self._dropped[key] = entry.item(key)
            self.counters.entries = len(self.entries)
        return removed

    def remove_copy(self, key: str, tag: int) -> list[str]:
        """Forget ``key`` only if the entry is still the copy with ``tag``."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.tag != tag:
                return []
        return self.remove([key])

    def expired_keys(self) -> list[str]:
        """Entries past their TTL, removed now; their files must go."""
        if self.max_age_seconds is None:
            return []
        keys = []
        with self.lock:
            for key in self._mortal:
                if not self._is_expired(key, self.entries[key]):
                    break
                keys.append(key)
        return self.remove(keys, expired=True)

    def take_reports(self) -> list[Item]:
        """Copies removed since the last call (for the index)."""
        with self.lock:
            dropped, self._dropped = list(self._dropped.values()), {}
            return dropped

    def items(self) -> list[Item]:
        """Every entry as the index knows it (for registration)."""
        with self.lock:
            return [e.item(k) for k, e in self.entries.items()]

    # -- peers ---------------------------------------------------------------------------
    def owner_hint(self, key: str) -> str | None:
        """The peer that served ``key`` last, unless it failed lately."""
        with self.lock:
            owner = self._owner_hints.get(key)
            return None if owner is None or self._failed(owner) else owner

    def served_by(self, key: str, address: str, nbytes: int) -> None:
        """A peer served ``key``: count it and remember the peer for next time."""
        with self.lock:
            self.counters.peer_reads += 1
            self.counters.peer_bytes += nbytes
            if len(self._owner_hints) >= MAX_OWNER_HINTS:
                self._owner_hints.pop(next(iter(self._owner_hints)))
            self._owner_hints[key] = address

    def drop_hint(self, key: str) -> None:
        """The hinted peer did not have ``key``."""
        with self.lock:
            self._owner_hints.pop(key, None)

    def peer_failed(self, address: str) -> None:
        """``address`` did not answer: do not ask it again for a while."""
        with self.lock:
            self._failed_peers[address] = self.clock()

    def peer_failed_lately(self, address: str) -> bool:
        """Whether ``address`` failed within the last :data:`PEER_BACKOFF` seconds."""
        with self.lock:
            return self._failed(address)

    def peer_left(self, address: str) -> None:
        """``address`` left the cluster: forget every hint naming it."""
        with self.lock:
            self._failed_peers[address] = self.clock()
            self._owner_hints = {k: a for k, a in self._owner_hints.items() if a != address}

    # -- internals (lock held) -------------------------------------------------------------
    def _advance(self) -> None:
        while self.applied_seq + 1 in self._applied_above:
            self.applied_seq += 1
            self._applied_above.discard(self.applied_seq)

    def _unlink_range(self, key: str) -> None:
        base = base_key(key)
        ranges = self._ranges.get(base) if base != key else None
        if ranges is not None:
            ranges.discard(key)
            if not ranges:
                del self._ranges[base]

    def _failed(self, address: str) -> bool:
        since = self._failed_peers.get(address)
        return since is not None and self.clock() - since < PEER_BACKOFF

    def _is_expired(self, key: str, entry: LocalEntry) -> bool:
        ttl = self.max_age_seconds
        return ttl is not None and not is_immutable(key) and self.clock() - entry.created > ttl

    def _add(self, key: str, entry: LocalEntry) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.counters.bytes -= old.size
        self.entries[key] = entry
        if not is_immutable(key):
            self._mortal.pop(key, None)
            self._mortal[key] = None
        base = base_key(key)
        if base != key:
            self._ranges.setdefault(base, set()).add(key)
        self.counters.bytes += entry.size
        self.counters.entries = len(self.entries)
