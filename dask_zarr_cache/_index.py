"""The global index: which worker owns which cached object, LRU, TTL and evictions.

:class:`CacheIndex` is the pure policy (no I/O, testable without a cluster);
:class:`~dask_zarr_cache._index_actor.IndexActor` is the Dask Actor shell around it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dask_zarr_cache._admission import Admission
from dask_zarr_cache._keys import base_key
from dask_zarr_cache._protocol import (
    FETCH,
    PEER,
    PENDING,
    CommitReply,
    Decision,
    Item,
    TouchReply,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["PENDING_TIMEOUT", "CacheIndex"]

#: A pending fetch older than this (seconds) may be taken over by another worker.
PENDING_TIMEOUT = 60.0


class _Entry:
    """One cached object: owner, size, owner's tag, creation time (index clock).

    No checksum: owners verify their files against the file's own trailer and peers check
    the checksum the owner sends with the bytes, so the index would only store it (32+
    bytes per key, a tenth of the memory budget).
    """

    __slots__ = ("created", "owner", "size", "tag")

    def __init__(self, owner: str, size: int, tag: int, created: float) -> None:
        self.owner = owner
        self.size = size
        self.tag = tag
        self.created = created


@dataclass
class _WorkerState:
    capacity: int
    used: int = 0
    #: Keys this worker holds, least recently used (cluster-wide) first.
    lru: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: Keys found expired by the index, to be deleted by the worker on its next call.
    expired: list[str] = field(default_factory=list)


class CacheIndex:
    """Ownership, per-worker budgets, replacement policy and TTL of all cached objects.

    Each worker's entries are kept in LRU order. When a commit takes a worker over its
    budget, ``"lru"`` evicts least recently used entries; ``"tinylfu"`` (the default) first
    compares the newcomer with that victim (:class:`~dask_zarr_cache._admission.Admission`,
    counting every access: misses asked here, hits reported by :meth:`touch`) and, unless
    the newcomer was read more often, evicts the newcomer instead.

    Parameters
    ----------
    max_age_seconds : float or None
        Entries older than this are absent (and queued for deletion on their owner).
    clock : callable
        Time source, seconds; tests inject their own.
    policy : {"tinylfu", "lru"}
        Replacement policy.

    """

    def __init__(
        self, max_age_seconds: float | None = None, clock=time.time, policy: str = "tinylfu"
    ) -> None:
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, tuple[str, float]] = {}
        self._workers: dict[str, _WorkerState] = {}
        # Range entries by whole-object key, so a write invalidates every range of it.
        self._ranges: dict[str, set[str]] = {}
        self._admission = Admission(policy)

    @property
    def policy(self) -> str:
        """The replacement policy, ``"tinylfu"`` or ``"lru"``."""
        return self._admission.policy

    @policy.setter
    def policy(self, policy: str) -> None:
        if policy != self.policy:
            self._admission = Admission(policy, len(self._entries))

    # -- queries -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def owner(self, key: str) -> str | None:
        """Return the worker holding ``key`` (ready entries only), or ``None``."""
        entry = self._entries.get(key)
        return None if entry is None else entry.owner

    def workers(self) -> dict[str, dict[str, int]]:
        """Per-worker ``{"capacity", "used", "entries"}``."""
        return {
            w: {"capacity": s.capacity, "used": s.used, "entries": len(s.lru)}
            for w, s in self._workers.items()
        }

    def lru_keys(self, worker: str) -> list[str]:
        """Keys held by ``worker``, least recently used first."""
        state = self._workers.get(worker)
        return [] if state is None else list(state.lru)

    # -- worker lifecycle ----------------------------------------------------------
    def register(self, worker: str, capacity: int, files: Iterable[Item] = ()) -> list[str]:
        """(Re)register ``worker`` with its budget and the files already on its disk.

        Returns the keys the worker must delete: files another worker already holds and
        files over its budget (least recently written first).
        """
        state = self._state(worker, capacity)
        files = list(files)
        # The worker's disk is the truth: forget entries it no longer has.
        on_disk = {item[0] for item in files}
        for key in [k for k in state.lru if k not in on_disk]:
            self._remove(key)
        to_delete = []
        now = self._clock()
        for key, size, tag in files:
            entry = self._entries.get(key)
            if entry is not None and entry.owner == worker:
                entry.tag = tag
                continue
            pending = self._pending.get(key)
            if pending is not None and pending[0] == worker:  # its own fetch: now on disk
                self._drop_pending(key)
                pending = None
            if entry is not None or pending is not None:
                to_delete.append(key)
                continue
            self._insert(key, _Entry(worker, size, tag, now), state)
        return to_delete + self._evict_over_budget(worker, state)

    def remove_worker(self, worker: str) -> int:
        """Forget ``worker`` and every entry it owned or was fetching; return entries dropped."""
        state = self._workers.pop(worker, None)
        for key, (owner, _since) in list(self._pending.items()):
            if owner == worker:
                self._drop_pending(key)
        if state is None:
            return 0
        for key in state.lru:
            self._entries.pop(key, None)
            self._unlink_range(key)
        return len(state.lru)

    # -- the read path -------------------------------------------------------------
    def acquire(self, worker: str, keys: Iterable[str], unreachable: str = "") -> list[Decision]:
        """Decide for each key how ``worker`` gets it.

        Each answer is a :class:`Decision`: ``(FETCH, worker)``, ``(PEER, owner)`` or
        ``(PENDING, fetcher)``.
        ``FETCH`` makes ``worker`` the pending owner: it must :meth:`commit` or
        :meth:`abandon` the key.

        Parameters
        ----------
        worker : str
            Address of the asking worker.
        keys : iterable of str
            Cache keys the worker missed.
        unreachable : str, optional
            A peer that just failed to serve these keys (dead, or its file is gone): its
            entry or claim for them is dropped first, so exactly one asker re-fetches.

        """
        now = self._clock()
        decisions = []
        for key in keys:
            self._admission.record(key)
            if unreachable:
                self._forget_holder(key, unreachable)
            entry = self._entries.get(key)
            if entry is not None and self._is_expired(entry, now):
                self._expire(key, entry)
                entry = None
            if entry is not None:
                if entry.owner != worker:
                    decisions.append(Decision(PEER, entry.owner))
                    continue
                # The owner itself missed: its file is gone. Fetch again.
                self._remove(key)
            pending = self._pending.get(key)
            if pending is not None and pending[0] != worker and now - pending[1] < PENDING_TIMEOUT:
                decisions.append(Decision(PENDING, pending[0]))
                continue
            self._pending[key] = (worker, now)
            self._link_range(key)
            decisions.append(Decision(FETCH, worker))
        return decisions

    def commit(self, worker: str, capacity: int, items: Iterable[Item]) -> CommitReply:
        """Record that ``worker`` now holds these objects.

        Returns
        -------
        evicted : list of str
            Keys of ``worker`` evicted (global LRU) to stay within ``capacity``.
        rejected : list of str
            Committed keys the index refused because ``worker`` no longer had the pending
            claim (invalidated by a write, taken over, or the index was rebuilt while
            fetching); the worker must delete them.

        """
        state = self._state(worker, capacity)
        now = self._clock()
        rejected, evicted = [], []
        for key, size, tag in items:
            pending = self._pending.get(key)
            if pending is None or pending[0] != worker or key in self._entries:
                rejected.append(key)
                continue
            del self._pending[key]
            self._insert(key, _Entry(worker, size, tag, now), state)
            evicted += self._evict_over_budget(worker, state, newcomer=key)
        return CommitReply(evicted, rejected)

    def abandon(self, worker: str, keys: Iterable[str]) -> None:
        """Give up pending claims of ``worker`` (its fetch failed or was not cacheable)."""
        for key in keys:
            pending = self._pending.get(key)
            if pending is not None and pending[0] == worker:
                self._drop_pending(key)

    def touch(
        self, worker: str, accessed: Iterable[str], dropped: Iterable[Item] = ()
    ) -> TouchReply:
        """Apply a worker's batched access records and the copies it deleted on its own.

        ``accessed`` keys are moved to the most recently used end of their owner's LRU.
        A ``dropped`` item removes its entry only if the tag matches: the worker may have
        fetched and committed a newer copy since.

        Returns
        -------
        expired : list of str
            Keys of ``worker`` the index found expired; the worker deletes them.
        known : bool
            Whether the index knows ``worker`` and every accessed key as its own; if not,
            the worker must :meth:`register` (its files are the truth).

        """
        for key, _size, tag in dropped:
            entry = self._entries.get(key)
            if entry is not None and entry.owner == worker and entry.tag == tag:
                self._remove(key)
        known = worker in self._workers
        for key in accessed:
            self._admission.record(key)
            entry = self._entries.get(key)
            if entry is not None:
                self._workers[entry.owner].lru.move_to_end(key)
            if entry is None or entry.owner != worker:
                known = False  # it holds a file the index lost track of: re-register
        if not known:
            return TouchReply([], False)
        state = self._workers[worker]
        expired, state.expired = state.expired, []
        return TouchReply(expired, True)

    def invalidate(
        self, keys: Iterable[str], prefixes: Iterable[str] = ()
    ) -> list[tuple[str, str]]:
        """Forget ``keys`` with all their byte ranges, and every key under ``prefixes``.

        ``keys`` are whole-object cache keys. Pending fetches of them lose their claim.

        Returns the ``(owner, key)`` pairs of ready entries that were dropped.
        """
        doomed = []
        for key in keys:
            doomed += [key, *self._ranges.get(key, ())]
        starts = tuple(prefixes)
        if starts:  # a directory delete: rare, so a scan is fine
            doomed += [k for k in (*self._entries, *self._pending) if k.startswith(starts)]
        dropped = []
        for key in doomed:
            entry = self._entries.get(key)
            if entry is not None:
                dropped.append((entry.owner, key))
                self._remove(key)
            elif key in self._pending:
                self._drop_pending(key)
        return dropped

    @property
    def pending_count(self) -> int:
        """Number of fetches in flight (claimed, not yet committed)."""
        return len(self._pending)

    def expire_all(self) -> int:
        """Drop every expired entry now (also done lazily by :meth:`acquire`)."""
        now = self._clock()
        expired = [(k, e) for k, e in self._entries.items() if self._is_expired(e, now)]
        for key, entry in expired:
            self._expire(key, entry)
        return len(expired)

    # -- internals -----------------------------------------------------------------
    def _state(self, worker: str, capacity: int) -> _WorkerState:
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _WorkerState(capacity)
        state.capacity = capacity
        return state

    def _is_expired(self, entry: _Entry, now: float) -> bool:
        return self.max_age_seconds is not None and now - entry.created > self.max_age_seconds

    def _insert(self, key: str, entry: _Entry, state: _WorkerState) -> None:
        self._admission.fit(len(self._entries) + 1)
        self._entries[key] = entry
        state.lru[key] = None
        state.used += entry.size
        self._link_range(key)

    def _remove(self, key: str) -> _Entry:
        entry = self._entries.pop(key)
        state = self._workers.get(entry.owner)
        if state is not None and key in state.lru:
            del state.lru[key]
            state.used -= entry.size
        self._unlink_range(key)
        return entry

    def _expire(self, key: str, entry: _Entry) -> None:
        self._remove(key)
        state = self._workers.get(entry.owner)
        if state is not None:
            state.expired.append(key)

    def _forget_holder(self, key: str, holder: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.owner == holder:
            self._remove(key)
        pending = self._pending.get(key)
        if pending is not None and pending[0] == holder:
            self._drop_pending(key)

    def _drop_pending(self, key: str) -> None:
        del self._pending[key]
        if key not in self._entries:
            self._unlink_range(key)

    def _evict_over_budget(
        self, worker: str, state: _WorkerState, newcomer: str | None = None
    ) -> list[str]:
        """Evict LRU entries until ``worker`` is within budget; the policy may pick ``newcomer``.

        TinyLFU's admission: the newcomer displaces the LRU victim only if it was read more
        often; otherwise the newcomer itself leaves (its reader already has its bytes).
        """
        evicted = []
        while state.used > state.capacity and state.lru:
            key = next(iter(state.lru))
            if newcomer not in (None, key) and self._admission.rejects(newcomer, key):
                key = newcomer
            if key == newcomer:
                newcomer = None  # compared once, as TinyLFU does
            self._remove(key)
            evicted.append(key)
        return evicted

    def _link_range(self, key: str) -> None:
        if base_key(key) != key:
            self._ranges.setdefault(base_key(key), set()).add(key)

    def _unlink_range(self, key: str) -> None:
        base = base_key(key)
        if base != key:
            ranges = self._ranges.get(base)
            if ranges is not None:
                ranges.discard(key)
                if not ranges:
                    del self._ranges[base]
