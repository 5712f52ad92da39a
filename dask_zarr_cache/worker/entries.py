"""The objects on one worker's disk: sizes, checksums, TTL order, budget, drop reports.

Not thread-safe on its own: :class:`~dask_zarr_cache.worker.state.LocalState` calls it
with its one lock held.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.core.protocol import Item
from dask_zarr_cache.identity.keys import base_key, is_immutable
from dask_zarr_cache.worker.budget import Budget
from dask_zarr_cache.worker.memory import MemoryCopies

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dask_zarr_cache.worker.counters import CacheCounters

__all__ = ["Entries", "LocalEntry"]

_tags = itertools.count(1)


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """One object on this worker's disk."""

    size: int
    checksum: int
    created: float  #: clock time the source read began (TTL and checks count from here)
    tag: int = field(default_factory=lambda: next(_tags))
    #: Whether it may be served.  ``False`` for a file of an earlier cluster that the write
    #: history cannot vouch for, until a listing of the source shows it unchanged.
    proven: bool = True
    #: Clock time a listing of the source last showed it unchanged (0.0: never).
    checked_at: float = 0.0

    def vouched_at(self) -> float:
        """Clock time the source last vouched for these bytes: read, or checked."""
        return max(self.created, self.checked_at)

    def item(self, key: str) -> Item:
        """How the index knows this copy."""
        return Item(key, self.size, self.tag)


class Entries(Mapping[str, LocalEntry]):
    """The entries by cache key, with what keeps them in budget and in their TTL.

    Parameters
    ----------
    max_age_seconds : float or None
        TTL of entries (snapshots' never expire).
    clock : callable
        Seconds, wall-clock-like.
    budget : Budget
        Which entries stay when the disk budget is full.
    counters : CacheCounters
        ``entries``, ``bytes``, ``evictions`` and ``expired`` are kept here.
    revalidate_after, revalidate_grace : float
        When entries are checked against their source, and how long one is still served
        while its check is late.
    memory : MemoryCopies, optional
        Copies of small entries' bytes; each goes with its entry (none: no copies).

    """

    def __init__(
        self,
        max_age_seconds: float | None,
        clock: Clock,
        budget: Budget,
        counters: CacheCounters,
        revalidate_after: float | None = None,
        revalidate_grace: float = 5.0,
        memory: MemoryCopies | None = None,
    ) -> None:
        self.max_age_seconds = max_age_seconds
        self.memory = MemoryCopies(0, 0) if memory is None else memory
        self.revalidate_after = revalidate_after
        self.revalidate_grace = revalidate_grace
        self.clock = clock
        self.budget = budget
        self.counters = counters
        self._by_key: dict[str, LocalEntry] = {}
        # Entries a TTL applies to (not a snapshot's), in creation order: the TTL sweep
        # walks it from the front.
        self._mortal: dict[str, None] = {}
        # With ``revalidate_after``: servable entries a revalidation applies to, in the
        # order the source last vouched for them (read, then each check re-adds):
        # :meth:`due` walks it from the front.
        self._vouched: dict[str, None] = {}
        self._ranges: dict[str, set[str]] = {}  # byte-range entries by whole-object key
        self._dropped: dict[str, Item] = {}  # removed since the last report to the index

    # -- a mapping of key -> entry ---------------------------------------------------------
    def __getitem__(self, key: str) -> LocalEntry:
        return self._by_key[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    # -- changes -----------------------------------------------------------------------------
    def add(self, key: str, entry: LocalEntry) -> None:
        """Add (or replace) the entry of ``key``."""
        old = self._by_key.pop(key, None)
        if old is not None:
            self.counters.bytes -= old.size
            if old.tag != entry.tag:  # other bytes (a check keeps the copy's tag)
                self.memory.drop(key)
        self._by_key[key] = entry
        if not is_immutable(key):
            if old is None or old.created != entry.created:  # a check keeps its TTL place
                self._mortal.pop(key, None)
                self._mortal[key] = None
            if self.revalidate_after is not None:
                self._vouched.pop(key, None)
                if entry.proven:
                    self._vouched[key] = None
        base = base_key(key)
        if base != key:
            self._ranges.setdefault(base, set()).add(key)
        self.counters.bytes += entry.size
        self.counters.entries = len(self._by_key)

    def remove(
        self, keys: Iterable[str], *, evicted: bool = False, expired: bool = False
    ) -> list[str]:
        """Forget entries; returns those that were (their files must go, the index is told)."""
        removed = []
        for key in keys:
            entry = self._by_key.pop(key, None)
            if entry is None:
                continue
            removed.append(key)
            self.memory.drop(key)
            self._mortal.pop(key, None)
            self._vouched.pop(key, None)
            self._unlink_range(key)
            self.budget.remove(key)
            self.counters.bytes -= entry.size
            self.counters.evictions += evicted
            self.counters.expired += expired
            self._dropped[key] = entry.item(key)
        self.counters.entries = len(self._by_key)
        return removed

    # -- queries -----------------------------------------------------------------------------
    def is_expired(self, key: str, entry: LocalEntry) -> bool:
        """Whether ``entry`` of ``key`` is past its TTL, or its check against the source is late.

        An entry due for a check (:meth:`due`) is still served while the check runs, for
        at most ``revalidate_grace`` seconds.
        """
        if is_immutable(key):
            return False
        ttl, check = self.max_age_seconds, self.revalidate_after
        now = self.clock()
        return (ttl is not None and now - entry.created > ttl) or (
            check is not None and now - entry.vouched_at() > check + self.revalidate_grace
        )

    def due(self) -> dict[str, LocalEntry]:
        """The servable entries the source last vouched for ``revalidate_after`` ago or more."""
        check = self.revalidate_after
        if check is None:
            return {}
        now = self.clock()
        due = {}
        for key in self._vouched:  # oldest vouched for first: stop at the first not due
            entry = self._by_key[key]
            if now - entry.vouched_at() < check:
                break
            due[key] = entry
        return due

    def expired(self) -> list[str]:
        """The keys past their TTL (oldest first)."""
        if self.max_age_seconds is None:
            return []
        keys = []
        for key in self._mortal:
            if not self.is_expired(key, self._by_key[key]):
                break
            keys.append(key)
        return keys

    def written(self, keys: Iterable[str], prefixes: tuple[str, ...]) -> list[str]:
        """The keys a write of whole objects ``keys`` and key ``prefixes`` replaced."""
        # Entries can be millions: look written keys up, scan only for prefixes.
        doomed = [k for key in keys for k in (key, *self._ranges.get(key, ())) if k in self]
        if prefixes:
            doomed += [k for k in self._by_key if k.startswith(prefixes)]
        return doomed

    def take_reports(self) -> list[Item]:
        """Copies removed since the last call (for the index)."""
        dropped, self._dropped = list(self._dropped.values()), {}
        return dropped

    def items_for_index(self) -> list[Item]:
        """Every servable entry as the index knows it (for registration)."""
        return [e.item(k) for k, e in self._by_key.items() if e.proven]

    def unproven(self, prefix: str) -> dict[str, LocalEntry]:
        """The entries below key ``prefix`` awaiting a check against the source."""
        return {k: e for k, e in self._by_key.items() if not e.proven and k.startswith(prefix)}

    def _unlink_range(self, key: str) -> None:
        base = base_key(key)
        ranges = self._ranges.get(base) if base != key else None
        if ranges is not None:
            ranges.discard(key)
            if not ranges:
                del self._ranges[base]
