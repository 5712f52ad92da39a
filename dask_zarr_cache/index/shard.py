"""The index of one shard: which worker holds which cached object, who fetches what.

:class:`CacheIndex` is the pure logic (no I/O, testable without a cluster);
:class:`~dask_zarr_cache.index.host.IndexHost` hosts it on a worker.

The index is a directory, not a cache manager.  Keys arrive as 64-bit digests
(:func:`~dask_zarr_cache.index.digests.key_digest`), and each entry is a row of a
:class:`~dask_zarr_cache.index.table.DigestTable`.  What stays on a worker's disk (its budget,
LRU order, admission) is the worker's own decision (:mod:`~dask_zarr_cache.worker.budget`),
which it reports as dropped copies; the index counts the cluster's misses of each key,
and hands the count to the worker it asks to fetch, for that decision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_zarr_cache.core.clock import wall_clock
from dask_zarr_cache.core.exceptions import ZarrCacheError
from dask_zarr_cache.core.protocol import FETCH, NOBODY, PEER, PENDING, Decision
from dask_zarr_cache.index.admission import Admission
from dask_zarr_cache.index.digests import IMMUTABLE_BIT
from dask_zarr_cache.index.table import DigestTable

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["CacheIndex"]

#: Workers one index can name at once (the table's owner column is 16 bits; 0 is free).
MAX_WORKERS = 65535


@dataclass
class _Worker:
    id: int
    address: str
    entries: int = 0
    #: Digests named so far by a registration sent in parts (``None``: none under way).
    seen: set[int] | None = None


class CacheIndex:
    """Ownership, pending fetches and TTL of the cached objects of one shard.

    Parameters
    ----------
    max_age_seconds : float or None
        Entries older than this are absent (their owners delete them on their own).
    clock : callable
        Time source, seconds; tests inject their own.
    policy : {"tinylfu", "lru"}
        Under ``"tinylfu"`` the index counts misses per key (a count-min sketch) and
        passes the count with each fetch decision.
    pending_timeout : float
        Seconds after which another worker may take over a claimed fetch.

    """

    def __init__(
        self,
        max_age_seconds: float | None = None,
        clock=wall_clock,
        policy: str = "tinylfu",
        pending_timeout: float = 60.0,
    ) -> None:
        self.max_age_seconds = max_age_seconds
        self.pending_timeout = pending_timeout
        self._clock = clock
        self._epoch = clock()  # rows store float32 seconds since then
        self._table = DigestTable()
        #: Pending fetches by digest: the fetcher, since when, and the claim's number.
        self._pending: dict[int, tuple[str, float, int]] = {}
        self._claims = itertools.count(1)
        self._workers: dict[str, _Worker] = {}
        self._by_id: dict[int, _Worker] = {}
        self._reads = Admission(policy)
        #: Keys decided by :meth:`acquire`, and the calls that asked for them (batches).
        self.decisions = 0
        self.asks = 0

    @property
    def policy(self) -> str:
        """The replacement policy, ``"tinylfu"`` or ``"lru"``."""
        return self._reads.policy

    @policy.setter
    def policy(self, policy: str) -> None:
        if policy != self.policy:
            self._reads = Admission(policy, len(self._table))

    # -- queries -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, digest: int) -> bool:
        return self._live_slot(digest, self._clock()) >= 0

    def owner(self, digest: int) -> str | None:
        """Return the worker holding ``digest`` (live entries only), or ``None``."""
        slot = self._live_slot(digest, self._clock())
        return None if slot < 0 else self._by_id[self._table.row(slot)[0]].address

    def workers(self) -> dict[str, dict[str, int]]:
        """Per-worker ``{"entries"}``."""
        return {w: {"entries": s.entries} for w, s in self._workers.items()}

    @property
    def pending_count(self) -> int:
        """Number of fetches in flight (claimed, not yet committed)."""
        return len(self._pending)

    @property
    def nbytes(self) -> int:
        """Bytes of the entry table (the bulk of the index's memory)."""
        return self._table.nbytes

    # -- worker lifecycle ----------------------------------------------------------
    def register(
        self,
        worker: str,
        files: Sequence[tuple[int, int]],
        first: bool = True,
        last: bool = True,
    ) -> list[int]:
        """(Re)register ``worker`` and the files ``(digest, tag)`` on its disk.

        A worker with many files sends them in parts, ``first`` to ``last``; its entries
        missing from every part are forgotten at the last (its disk is the truth).  Returns
        the positions in ``files`` the worker must delete: objects another worker holds
        or is fetching.
        """
        state = self._worker(worker)
        if first or state.seen is None:
            state.seen = set()
        seen = state.seen
        to_delete = self._add(state, files, own_fetch_landed=True)
        if last:
            mine = self._table.slots_where(self._table.owners == state.id)
            # kind="sort": numpy 2.0's default picks a lookup table for a narrow range of
            # values and overflows on uint64 digests above 2**63 (OverflowError).
            on_disk = np.fromiter(seen, np.uint64)
            gone = mine[~np.isin(self._table.digests[mine], on_disk, kind="sort")]
            if gone.size:
                doomed = np.zeros(self._table.size, bool)
                doomed[gone] = True
                self._table.drop(doomed)
                state.entries -= gone.size
            state.seen = None
        return to_delete

    def add(self, worker: str, files: Sequence[tuple[int, int]]) -> list[int]:
        """Record more files ``(digest, tag)`` on ``worker``'s disk; forget none of the others.

        For files that became servable (a check of the source proved them current).
        Returns the positions in ``files`` the worker must delete, as :meth:`register`.
        A file whose key ``worker`` itself is fetching again is left out: that fetch's
        copy replaces it and commits (taking the claim over here would have the commit
        refused, and the index would list a copy the worker no longer has).
        """
        return self._add(self._worker(worker), files, own_fetch_landed=False)

    def _add(
        self, state: _Worker, files: Sequence[tuple[int, int]], own_fetch_landed: bool
    ) -> list[int]:
        """Insert ``files`` of ``state``'s worker; the positions it must delete.

        ``own_fetch_landed``: a pending claim of the worker itself is a fetch whose file
        is among ``files`` (a registration after a restart), so the file takes it over.
        """
        to_delete = []
        now = self._clock()
        for position, (digest, tag) in enumerate(files):
            if state.seen is not None:  # not forgotten at the last part of a registration
                state.seen.add(digest)
            slot = self._live_slot(digest, now)
            if slot >= 0 and self._table.row(slot)[0] == state.id:
                self._table.set_tag(slot, tag)
                continue
            pending = self._pending.get(digest)
            if pending is not None and pending[0] == state.address:
                if not own_fetch_landed:
                    continue
                del self._pending[digest]
                pending = None
            if slot >= 0 or pending is not None:
                to_delete.append(position)
                continue
            self._insert(digest, state, tag, now)
        return to_delete

    def remove_worker(self, worker: str) -> int:
        """Forget ``worker`` and every entry it owned or was fetching; return entries dropped."""
        for digest, (fetcher, _since, _claim) in list(self._pending.items()):
            if fetcher == worker:
                del self._pending[digest]
        state = self._workers.pop(worker, None)
        if state is None:
            return 0
        del self._by_id[state.id]
        return self._table.drop(self._table.owners == state.id)

    # -- the read path -------------------------------------------------------------
    def acquire(
        self, worker: str, digests: Iterable[int], unreachable: Sequence[Any] = NOBODY
    ) -> list[Decision]:
        """Decide for each key how ``worker`` gets it.

        Each answer is a :class:`Decision`: ``(FETCH, worker, reads)``, ``(PEER, owner)``
        or ``(PENDING, fetcher)``; ``reads`` is the cluster's recent misses of the key.
        ``FETCH`` makes ``worker`` the pending owner: it must :meth:`commit` or
        :meth:`abandon` the key.

        Parameters
        ----------
        worker : str
            Address of the asking worker.
        digests : iterable of int
            Digests of the cache keys the worker missed.
        unreachable : (str, int), optional
            A peer that just failed to serve these keys (dead, or its file is gone), and
            the claim the asker was sent to it for (0: its copy): that entry or claim is
            dropped first, so exactly one asker re-fetches.  A claim the peer took or
            renewed since (it asked itself: its fetch runs now) stays, and the asker is
            sent to it again.

        """
        now = self._clock()
        me = self._workers.get(worker)
        peer, claim = unreachable
        gone = self._workers.get(peer) if peer else None
        decisions = []
        for digest in digests:
            self._reads.record(digest)
            slot = self._live_slot(digest, now)
            if slot >= 0:
                owner = self._table.row(slot)[0]
                if me is None or owner != me.id:
                    if gone is None or owner != gone.id:
                        decisions.append(Decision(PEER, self._by_id[owner].address))
                        continue
                self._remove(slot)  # the holder failed, or the asker lost its own file
            pending = self._pending.get(digest)
            if pending is not None and (
                (pending[0] == peer and claim == pending[2])
                or (pending[0] != worker and now - pending[1] >= self.pending_timeout)
            ):
                pending = None
            if pending is not None and pending[0] != worker:
                decisions.append(Decision(PENDING, pending[0], 0, pending[2]))
                continue
            self._pending[digest] = (worker, now, next(self._claims))
            decisions.append(Decision(FETCH, worker, self._reads.count(digest)))
        if decisions:
            self.asks += 1
            self.decisions += len(decisions)
        return decisions

    def commit(self, worker: str, items: Sequence[tuple[int, int]]) -> list[int]:
        """Record that ``worker`` now holds the objects ``(digest, tag)``.

        Returns the positions in ``items`` the index refused because ``worker`` no longer
        had the pending claim (invalidated by a write, taken over, or the index was
        rebuilt while fetching); the worker must delete those.
        """
        if not items:
            return []
        state = self._worker(worker)
        now = self._clock()
        rejected = []
        for position, (digest, tag) in enumerate(items):
            pending = self._pending.get(digest)
            if pending is None or pending[0] != worker or self._live_slot(digest, now) >= 0:
                rejected.append(position)
                continue
            del self._pending[digest]
            if state.seen is not None:  # not forgotten at the last part of a registration
                state.seen.add(digest)
            self._insert(digest, state, tag, now)
        return rejected

    def abandon(self, worker: str, digests: Iterable[int]) -> None:
        """Give up pending claims of ``worker`` (its fetch failed or was not cacheable)."""
        for digest in digests:
            pending = self._pending.get(digest)
            if pending is not None and pending[0] == worker:
                del self._pending[digest]

    def touch(self, worker: str, dropped: Iterable[tuple[int, int]] = ()) -> bool:
        """Apply the copies ``(digest, tag)`` a worker deleted; whether it knows the worker.

        A dropped copy removes its entry only if the tag matches: the worker may have
        fetched and committed a newer copy since.  An unknown worker must
        :meth:`register` (its files are the truth).
        """
        state = self._workers.get(worker)
        if state is None:
            return False
        for digest, tag in dropped:
            slot = self._table.find(digest)
            if slot >= 0 and self._table.row(slot)[:2] == (state.id, tag & 0xFFFFFFFF):
                self._remove(slot)
        return True

    def invalidate(self, digests: Iterable[int]) -> int:
        """Forget written keys, and their pending fetches; returns entries dropped.

        Byte ranges of a written object and keys under a deleted prefix are left to
        their owners: every write reaches them before it returns, they drop the files and
        report them; a reader sent to one meanwhile hears "missing" and asks again.
        """
        dropped = 0
        for digest in digests:
            slot = self._table.find(digest)
            if slot >= 0:
                self._remove(slot)
                dropped += 1
            self._pending.pop(digest, None)
        return dropped

    def cached(self, digests: Iterable[int]) -> list[bool]:
        """Whether each key has a live entry."""
        now = self._clock()
        return [self._live_slot(d, now) >= 0 for d in digests]

    # -- internals -----------------------------------------------------------------
    def _worker(self, worker: str) -> _Worker:
        state = self._workers.get(worker)
        if state is None:
            free = next((i for i in range(1, MAX_WORKERS + 1) if i not in self._by_id), None)
            if free is None:
                raise ZarrCacheError(f"an index shard names at most {MAX_WORKERS} workers")
            state = self._workers[worker] = self._by_id[free] = _Worker(free, worker)
        return state

    def _live_slot(self, digest: int, now: float) -> int:
        """Slot of ``digest``'s entry; an expired one is removed and -1 returned."""
        slot = self._table.find(digest)
        if slot >= 0 and self.max_age_seconds is not None and not digest & IMMUTABLE_BIT:
            if now - self._epoch - self._table.row(slot)[2] > self.max_age_seconds:
                self._remove(slot)
                return -1
        return slot

    def _insert(self, digest: int, state: _Worker, tag: int, now: float) -> None:
        self._table.put(digest, state.id, tag, now - self._epoch)
        state.entries += 1
        self._reads.fit(len(self._table))

    def _remove(self, slot: int) -> None:
        self._by_id[self._table.row(slot)[0]].entries -= 1
        self._table.remove(slot)
