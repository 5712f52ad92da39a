"""A worker's bookkeeping of its cache, without I/O: one lock over the parts, split by job.

:class:`LocalState` is shared by the task threads, zarr's event loop and the worker's
event loop of one worker.  Its parts each do one job: the entries on disk with their
TTL and budget (:mod:`~dask_zarr_cache.worker.entries`), the loads in flight
(:mod:`~dask_zarr_cache.worker.flights`), the position in the write history with the
lease (:mod:`~dask_zarr_cache.writes.position`), what is known of peers
(:mod:`~dask_zarr_cache.worker.hints`) and the counters.  One lock covers them all,
because a write must poison the loads of its keys and drop their entries in one step
(else a load admitted between the two would keep what the write replaced), and every
counter is updated under it.  Whatever needs a disk or a network (delete a file, tell the
index) is returned to the caller, the I/O shell in :mod:`dask_zarr_cache.worker.cache`.
Time comes from an injected clock, so unit tests drive TTL, leases and peer back-off
without waiting.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from distributed.metrics import context_meter

from dask_zarr_cache.core.clock import Clock, wall_clock
from dask_zarr_cache.worker.budget import Budget
from dask_zarr_cache.worker.counters import CacheCounters
from dask_zarr_cache.worker.entries import Entries, LocalEntry
from dask_zarr_cache.worker.flights import SOURCE, Fetch, Flights
from dask_zarr_cache.worker.hints import PeerHints
from dask_zarr_cache.worker.memory import MemoryCopies
from dask_zarr_cache.writes.log import matcher
from dask_zarr_cache.writes.marks import UNSEQUENCED
from dask_zarr_cache.writes.position import Position

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dask_zarr_cache.core.protocol import Item, Payload, WriteReply
    from dask_zarr_cache.worker.disk import CacheFile

__all__ = ["TIMED_METRICS", "Fetch", "LocalEntry", "LocalState"]

#: The fine performance metric (dashboard) that each of the read path's timing counters
#: also feeds: where a read's time went, as users see it.
TIMED_METRICS = {
    "index_wait_us": "zarr-cache-index-wait",
    "peer_wait_us": "zarr-cache-peer-fetch",
    "source_wait_us": "zarr-cache-source-fetch",
    "file_write_us": "zarr-cache-file-write",
}


#: Writes whose drops are remembered (see ``LocalState.evict``): far more than can be in
#: flight between a catch-up and a push.
_DROPS_KEPT = 1024


class LocalState:
    """Entries, loads in flight, write position, peer knowledge and counters of a worker.

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
    peer_backoff : float
        Seconds a peer that failed to answer is in back-off (its first answer ends it).
    max_hints : int
        "Which peer served this key" hints kept.
    revalidate_after, revalidate_grace : float
        When entries are checked against their source, and how long one is still served
        while its check is late (see :class:`~dask_zarr_cache.worker.entries.Entries`).
    memory_size, memory_object_limit : int
        Bytes of small objects' copies kept in memory, and the largest object kept so
        (see :class:`~dask_zarr_cache.worker.memory.MemoryCopies`).

    """

    def __init__(
        self,
        max_age_seconds: float | None,
        lease: float,
        clock: Clock = wall_clock,
        capacity: int = 0,
        policy: str = "tinylfu",
        peer_backoff: float = 30.0,
        max_hints: int = 200_000,
        revalidate_after: float | None = None,
        revalidate_grace: float = 5.0,
        memory_size: int = 0,
        memory_object_limit: int = 0,
    ) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.counters = CacheCounters(capacity=capacity)
        self._reads_in_flight = 0  # for read_busy_us (see reading)
        self._busy_since = 0.0
        self.entries = Entries(
            max_age_seconds,
            clock,
            Budget(capacity, policy),
            self.counters,
            revalidate_after,
            revalidate_grace,
            MemoryCopies(memory_size, memory_object_limit),
        )
        self.flights = Flights()
        self.writes = Position(lease, clock)
        self.hints = PeerHints(clock, peer_backoff, max_hints)
        # Files found on disk at start, not served until the write history clears them.
        self.unverified: dict[str, CacheFile] = {}
        #: Objects and bytes each of the latest writes applied here dropped (by epoch and
        #: seq), for the reply to an eviction's push.
        self._dropped: dict[tuple[bytes, int], tuple[int, int]] = {}

    @property
    def epoch(self) -> bytes | None:
        """Whose write history this worker follows (``None`` before its first catch-up)."""
        return self.writes.epoch

    @property
    def applied_seq(self) -> int:
        """The write up to which every write is applied here."""
        return self.writes.applied_seq

    # -- counters ------------------------------------------------------------------------
    def count(self, **increments: int) -> None:
        """Add to counters, e.g. ``count(remote_reads=1, remote_bytes=n)``."""
        with self.lock:
            for name, n in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + n)

    @contextlib.contextmanager
    def timed(self, counter: str) -> Iterator[None]:
        """Add the block's wall time, in microseconds, to ``counter`` (a ``*_us`` field).

        The same time goes to the fine performance metric ``TIMED_METRICS[counter]``, so
        the dashboard's Fine Performance Metrics show the split the counters show.
        """
        start = time.perf_counter()
        try:
            with context_meter.meter(TIMED_METRICS[counter]):
                yield
        finally:
            self.count(**{counter: int((time.perf_counter() - start) * 1e6)})

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Time one read in the read path: ``read_us``, and ``read_busy_us`` when it is alone.

        ``read_busy_us`` grows by the time at least one read was in flight, so that the
        summed waits of a task's concurrent reads can be set against the time they took.
        """
        start = time.perf_counter()
        with self.lock:
            self._reads_in_flight += 1
            if self._reads_in_flight == 1:
                self._busy_since = start
        try:
            yield
        finally:
            end = time.perf_counter()
            with self.lock:
                self._reads_in_flight -= 1
                self.counters.read_us += int((end - start) * 1e6)
                if self._reads_in_flight == 0:
                    self.counters.read_busy_us += int((end - self._busy_since) * 1e6)

    def gauge(self, **values: int) -> None:
        """Set gauges, e.g. ``gauge(caching_disabled=1)``."""
        with self.lock:
            for name, value in values.items():
                setattr(self.counters, name, value)

    def counts(self) -> dict[str, int]:
        """Every counter, read in one step."""
        with self.lock:
            return self.counters.as_dict()

    # -- serving -------------------------------------------------------------------------
    def can_serve(self) -> bool:
        """Whether this worker's files may be served.

        They may while it caught up with the write history within ``lease`` seconds: a
        write it did not confirm waits that long before it returns.
        """
        with self.lock:
            return self.writes.can_serve()

    def lookup(self, key: str) -> tuple[LocalEntry | None, bool]:
        """The live entry of ``key``, and whether it just expired (its file must go)."""
        with self.lock:
            return self._lookup(key)

    def _lookup(self, key: str) -> tuple[LocalEntry | None, bool]:
        entry = self.entries.get(key)
        if entry is not None and not entry.proven:  # not served before its check
            return None, False
        if entry is None or not self.entries.is_expired(key, entry):
            return entry, False
        return None, bool(self.entries.remove([key], expired=True))

    def find(self, key: str) -> tuple[LocalEntry | None, bool, Payload | None]:
        """The live entry of ``key``, whether it just expired, and its copy in memory if any."""
        with self.lock:
            return self._find(key)

    def local_hit(self, key: str) -> tuple[LocalEntry | None, bool, Payload | None]:
        """A read of ``key`` on this worker, in one hold of the lock.

        Returns what :meth:`find` does; a copy in memory is counted as a hit already.
        With an entry and no copy, the caller reads the file and calls :meth:`record_hit`.
        """
        with self.lock:
            entry, expired, data = self._find(key)
            if data is not None:
                self.counters.memory_hits += 1
                self.counters.memory_hit_bytes += len(data)
                self._hit(key, len(data))
            return entry, expired, data

    def _find(self, key: str) -> tuple[LocalEntry | None, bool, Payload | None]:
        entry, expired = self._lookup(key)
        return entry, expired, None if entry is None else self.entries.memory.get(key, entry.tag)

    def record_hit(self, key: str, entry: LocalEntry, data: Payload) -> None:
        """Count a read of ``entry``'s file, ``data`` (verified); keep a copy if small."""
        with self.lock:
            self._hit(key, len(data))
            self._remember(key, entry, data)

    def remember(self, key: str, entry: LocalEntry, data: Payload) -> None:
        """``data`` is what ``entry``'s file holds: keep a copy in memory if it is small."""
        with self.lock:
            self._remember(key, entry, data)

    def _hit(self, key: str, nbytes: int) -> None:
        self.counters.hits += 1
        self.counters.hit_bytes += nbytes
        self.entries.budget.touch(key)

    def _remember(self, key: str, entry: LocalEntry, data: Payload) -> None:
        if self.entries.get(key) is entry:  # not removed or replaced meanwhile
            self.entries.memory.put(key, entry.tag, data)

    def record_served(self, key: str, nbytes: int) -> None:
        """Count bytes of ``key`` served to a peer (an access, for the budget)."""
        with self.lock:
            self.counters.peer_served += 1
            self.counters.peer_served_bytes += nbytes
            self.entries.budget.touch(key)

    # -- single-flight -------------------------------------------------------------------
    def begin_fetch(self, key: str) -> tuple[Fetch, bool]:
        """The in-flight load of ``key`` and whether the caller leads it (must load)."""
        with self.lock:
            fetch, leader = self.flights.begin(key, self.writes.applied_seq)
            self.counters.misses += leader
            return fetch, leader

    def begin_keep(
        self, key: str, reply: WriteReply, since: tuple[bytes | None, int]
    ) -> Fetch | None:
        """A load of ``key`` from this worker's own write (``cache_writes``), or ``None``.

        ``reply`` is the scheduler's for the write, ``since`` this worker's position
        before the write reached the source.  The bytes are the source's only if no other
        write of ``key`` was numbered after ``since`` (it may have reached the source
        later) and none shared the write's batch: with every write up to the write's
        applied here, the write marks say so.  ``None`` too if this worker follows
        another history or a load of ``key`` is in flight (it keeps what it reads).
        Writes that come later poison the load, as any other.
        """
        with self.lock:
            if (
                not reply.epoch == since[0] == self.writes.epoch
                or key in reply.contested
                or self.writes.applied_seq < reply.seq
                or self.flights.get(key) is not None
                or self.writes.marks.replaced_between(key, since[1], reply.seq)
            ):
                return None
            return self.flights.begin(key, reply.seq, SOURCE)[0]  # the bytes are in hand

    def inflight(self, key: str) -> Fetch | None:
        """The load of ``key`` that new readers would join, if any."""
        with self.lock:
            return self.flights.get(key)

    def pending_fetches(self) -> list[concurrent.futures.Future[Payload | None]]:
        """Futures of every load in flight."""
        with self.lock:
            return self.flights.futures()

    def end_fetch(self, key: str, fetch: Fetch) -> None:
        """The leader is done with ``fetch`` (however it ended)."""
        with self.lock:
            self.flights.end(key, fetch)

    def superseded(self, key: str, fetch: Fetch) -> bool:
        """Whether a newer load or copy of ``key`` replaced ``fetch`` here (a write came).

        The index knows claims by worker, so the cluster-wide claim is then the newer
        load's: giving it up for ``fetch`` would take it from the newer one.
        """
        with self.lock:
            return self.flights.replaced(key, fetch) or key in self.entries

    def admit(
        self,
        key: str,
        entry: LocalEntry,
        fetch: Fetch,
        reads: int = 0,
        data: Payload | None = None,
    ) -> tuple[bool, list[str]]:
        """Add the entry a fetch wrote, unless a write poisoned the fetch meanwhile.

        ``reads`` is how often the cluster asked for ``key`` lately (from the index);
        ``data``, the bytes written to its file, is kept in memory too if it is small.
        Returns whether the entry stays, and the keys whose files must go: evicted to
        stay within the budget, and ``key`` itself unless it stays.
        """
        with self.lock:
            if fetch.poisoned:
                return False, [key]
            budget = self.entries.budget
            budget.record(key, reads)
            self.entries.add(key, entry)
            evicted = budget.admit(key, entry.size)
            doomed = self.entries.remove(evicted, evicted=True)
            if data is not None:
                self._remember(key, entry, data)
            return key not in evicted, doomed

    def adopt(self, files: Iterable[CacheFile], proven: bool = True) -> list[str]:
        """Add files found on disk (oldest first).

        ``proven``: the write history vouched for them; else they wait, not served, for a
        check against the source (:meth:`proved`).  Returns the keys of the oldest files
        beyond the budget: they must go.
        """
        evicted = []
        with self.lock:
            for f in sorted(files, key=lambda f: f.mtime):
                entry = LocalEntry(f.size, f.checksum, f.fetched_at or f.mtime)
                self.entries.add(f.key, entry if proven else replace(entry, proven=False))
                evicted += self.entries.budget.add(f.key, f.size)
            return self.entries.remove(evicted, evicted=True)

    def unproven(self, prefix: str) -> dict[str, LocalEntry]:
        """The entries below key ``prefix`` awaiting a check against the source."""
        with self.lock:
            return self.entries.unproven(prefix)

    def due_for_check(self) -> dict[str, LocalEntry]:
        """The entries to check against their source now (``revalidate_after``)."""
        with self.lock:
            return self.entries.due()

    def checked(
        self, current: dict[str, LocalEntry], stale: dict[str, LocalEntry], **changes: Any
    ) -> list[str]:
        """A check of the source showed the entries ``current`` unchanged, ``stale`` not.

        The current ones get ``changes`` (``proven=True`` for files of an earlier cluster,
        ``checked_at=`` for a revalidation).  Only the very entries checked change: one a
        write removed or replaced meanwhile stays as it is now.  Returns the keys whose
        files must be deleted.
        """
        with self.lock:
            for key, entry in current.items():
                if self.entries.get(key) is entry:
                    self.entries.add(key, replace(entry, **changes))
            return self.entries.remove(k for k, e in stale.items() if self.entries.get(k) is e)

    # -- writes --------------------------------------------------------------------------
    def invalidate(self, keys: Iterable[str], prefixes: Iterable[str]) -> list[str]:
        """Apply this worker's own write before the scheduler numbered it (see :meth:`numbered`).

        Poisons and detaches matching loads, drops matching entries.  Returns the keys
        whose files must be deleted.
        """
        with self.lock:
            return self._invalidate(list(keys), tuple(prefixes), UNSEQUENCED)[0]

    def apply_write(
        self, epoch: bytes, seq: int, keys: Iterable[str], prefixes: Iterable[str]
    ) -> list[str]:
        """Apply write ``seq`` of ``epoch``'s history, unless it was applied here already.

        As :meth:`invalidate`, then the write counts as applied.  A write reaches a worker
        twice, pushed and brought by a catch-up, in either order and either late; only
        the first application counts.  A second one would poison the loads begun since
        the first and drop the files they kept, though they read the source after the
        write reached it: a second GET of the key cluster-wide.  Returns the keys whose
        files must be deleted.
        """
        with self.lock:
            if self._applied_already(epoch, seq):
                return []
            return self._apply(epoch, seq, list(keys), tuple(prefixes))

    def evict(
        self, epoch: bytes, seq: int, keys: Iterable[str], prefixes: Iterable[str]
    ) -> tuple[list[str], int, int]:
        """Apply eviction ``seq`` of ``epoch``'s history: a write that left the source unchanged.

        Once, as :meth:`apply_write`.  Returns the keys whose files must be deleted, and
        the objects and bytes the eviction dropped here, whichever route applied it (a
        catch-up may bring it before its push: the push's reply still counts them).
        """
        with self.lock:
            doomed = []
            if not self._applied_already(epoch, seq):
                doomed = self._apply(epoch, seq, list(keys), tuple(prefixes))
            return (doomed, *self._dropped.get((epoch, seq), (0, 0)))

    def _applied_already(self, epoch: bytes, seq: int) -> bool:
        return epoch == self.writes.epoch and self.writes.has_applied(seq)

    def _apply(
        self, epoch: bytes, seq: int, keys: list[str], prefixes: tuple[str, ...]
    ) -> list[str]:
        doomed, nbytes = self._invalidate(keys, prefixes, seq)
        self.writes.applied(seq)  # pushes may arrive out of order
        self._dropped[(epoch, seq)] = (len(doomed), nbytes)
        if len(self._dropped) > _DROPS_KEPT:
            del self._dropped[next(iter(self._dropped))]
        return doomed

    def _invalidate(
        self, keys: list[str], prefixes: tuple[str, ...], seq: int
    ) -> tuple[list[str], int]:
        """Keys whose files must go, and their bytes (one scan for a prefix write)."""
        matches = matcher(keys, prefixes)
        self.writes.marks.mark(seq, keys, prefixes)
        self.flights.poison(matches)
        unverified = [k for k in self.unverified if matches(k)]  # only before a sync
        nbytes = sum(self.unverified.pop(key).size for key in unverified)
        written = self.entries.written(keys, prefixes)
        nbytes += sum(self.entries[k].size for k in written)
        return unverified + self.entries.remove(written), nbytes

    def numbered(self, keys: Iterable[str], prefixes: Iterable[str], seq: int) -> None:
        """Number this worker's own write, applied before it had a number, ``seq``."""
        with self.lock:
            self.writes.marks.numbered(keys, prefixes, seq)

    def synced(self, epoch: bytes, seq: int, sent_at: float) -> None:
        """Record a catch-up with the scheduler sent at ``sent_at``.

        The writes it brought are applied first; under a new epoch, after
        :meth:`forget_all`: the new history's position replaces the old one.
        """
        with self.lock:
            self.writes.synced(epoch, seq, sent_at)

    def sync_position(self) -> tuple[bytes | None, int]:
        """Where this worker's history stands; before the first sync, its oldest file's."""
        with self.lock:
            if self.writes.epoch is not None or not self.unverified:
                return self.writes.epoch, self.writes.applied_seq
            oldest = min(self.unverified.values(), key=lambda f: f.seq)
            return oldest.epoch, oldest.seq

    def found(self, files: Iterable[CacheFile]) -> None:
        """Files found on disk at start: not served until the write history clears them."""
        with self.lock:
            self.unverified = {f.key: f for f in files}

    def has_unverified(self) -> bool:
        """Whether files found on disk at start still wait for the history's verdict."""
        with self.lock:
            return bool(self.unverified)

    def take_unverified(self) -> list[CacheFile]:
        """The files found on disk at start, handed over to the catch-up that judges them."""
        with self.lock:
            files, self.unverified = list(self.unverified.values()), {}
            return files

    def position(self) -> tuple[bytes | None, int]:
        """Whose history, and up to which write every write is applied here.

        A file this worker serves is current up to this position: a write up to it that
        replaced the file's key deleted the file first.
        """
        with self.lock:
            return self.writes.epoch, self.writes.applied_seq

    def current(self, key: str, epoch: object, seq: object) -> bool:
        """Whether bytes of ``key`` a peer served at position ``(epoch, seq)`` are current.

        They are if the peer had applied every write this worker applied to ``key``: a
        write's invalidation may reach the peer after it reached this worker.
        """
        with self.lock:
            return self.writes.current(key, epoch, seq)

    def forget_all(self, seq: int) -> list[str]:
        """Distrust every file (the write history up to ``seq`` was lost); keys to delete.

        Peers' bytes are trusted again from their position ``seq`` on.
        """
        with self.lock:
            self.writes.forget(seq)
            unverified = list(self.unverified)
            self.unverified.clear()
            self.flights.poison(lambda _key: True)
            return unverified + self.entries.remove(list(self.entries))

    # -- removal -------------------------------------------------------------------------
    def remove(
        self, keys: Iterable[str], *, evicted: bool = False, expired: bool = False
    ) -> list[str]:
        """Forget entries; returns those that were (their files must go, the index is told)."""
        with self.lock:
            return self.entries.remove(keys, evicted=evicted, expired=expired)

    def remove_copy(self, key: str, tag: int) -> list[str]:
        """Forget ``key`` only if the entry is still the copy with ``tag``.

        Checked and removed under one hold of the lock: a newer copy admitted between the
        two would be lost otherwise.
        """
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.tag != tag:
                return []
            return self.entries.remove([key])

    def expired_keys(self) -> list[str]:
        """Entries past their TTL, removed now; their files must go."""
        with self.lock:
            return self.entries.remove(self.entries.expired(), expired=True)

    def take_reports(self) -> list[Item]:
        """Copies removed since the last call (for the index)."""
        with self.lock:
            return self.entries.take_reports()

    def items(self) -> list[Item]:
        """Every entry as the index knows it (for registration)."""
        with self.lock:
            return self.entries.items_for_index()

    # -- peers ---------------------------------------------------------------------------
    def owner_hint(self, key: str) -> str | None:
        """The peer that served ``key`` last, unless it failed lately."""
        with self.lock:
            return self.hints.owner(key)

    def served_by(self, key: str, address: str, nbytes: int) -> None:
        """A peer served ``key``: count it and remember the peer for next time."""
        with self.lock:
            self.counters.peer_reads += 1
            self.counters.peer_bytes += nbytes
            self.hints.served(key, address)

    def drop_hint(self, key: str) -> None:
        """The hinted peer did not have ``key``."""
        with self.lock:
            self.hints.drop(key)

    def peer_failed(self, address: str, probe: bool = False) -> None:
        """``address`` did not answer: do not ask it again for a while (see ``PeerHints``)."""
        with self.lock:
            self.hints.failed(address, probe)

    def peer_patience(self, address: str, full: float, probe: float, quiet: float) -> float:
        """Seconds a read waits for peer ``address`` (see :meth:`PeerHints.patience`)."""
        with self.lock:
            return self.hints.patience(address, full, probe, quiet)

    def peer_answered(self, address: str) -> None:
        """``address`` answered: its back-off, if any, ends."""
        with self.lock:
            self.hints.answered(address)

    def peer_left(self, address: str) -> None:
        """``address`` left the cluster: forget every hint naming it."""
        with self.lock:
            self.hints.left(address)
