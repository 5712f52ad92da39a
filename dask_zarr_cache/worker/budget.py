"""``Budget``: which objects stay on one worker's disk, within its byte budget.

A worker decides this itself, not the index: it sees every access to its copies, its own
hits and the reads it serves to peers (there are no second copies), so it knows their
recency and frequency first hand, and no access records need to cross the network.  The
index counts misses cluster-wide and passes the count along with a fetch decision, so a
newcomer is judged on every read of it, not only this worker's.
"""

from __future__ import annotations

from collections import OrderedDict

from dask_zarr_cache.index.admission import Admission

__all__ = ["Budget"]


class Budget:
    """Byte budget, LRU order and admission policy of one worker's cached objects.

    When a new object takes the worker over its budget, ``"lru"`` evicts the least
    recently used objects; ``"tinylfu"`` (the default) first compares the newcomer with that
    victim (:class:`~dask_zarr_cache.index.admission.Admission`) and, unless the newcomer was
    read more often, evicts the newcomer instead.  Not thread-safe: the worker's
    :class:`~dask_zarr_cache.worker.state.LocalState` calls it under its lock.

    Parameters
    ----------
    capacity : int
        Bytes the worker may keep.
    policy : {"tinylfu", "lru"}
        Replacement policy.

    """

    def __init__(self, capacity: int, policy: str = "tinylfu") -> None:
        self.capacity = capacity
        self.used = 0
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self._admission = Admission(policy)

    @property
    def policy(self) -> str:
        """The replacement policy, ``"tinylfu"`` or ``"lru"``."""
        return self._admission.policy

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: str) -> bool:
        return key in self._lru

    def lru_keys(self) -> list[str]:
        """Keys held, least recently used first."""
        return list(self._lru)

    def record(self, key: str, reads: int = 0) -> None:
        """Count a miss of ``key`` here; ``reads``: how often the cluster asked for it."""
        self._admission.record(key)
        if reads:
            self._admission.raise_to(key, reads)

    def touch(self, key: str) -> None:
        """Count a read of a held object (a local hit or a read served to a peer)."""
        if key in self._lru:
            self._lru.move_to_end(key)
        self._admission.record(key)

    def add(self, key: str, size: int) -> list[str]:
        """Hold ``key`` (found on disk); returns least recently used keys over the budget."""
        self._insert(key, size)
        return self._evict(None)

    def admit(self, key: str, size: int) -> list[str]:
        """Hold a newly fetched ``key``; returns the keys to evict, maybe ``key`` itself."""
        self._insert(key, size)
        return self._evict(key)

    def remove(self, key: str) -> None:
        """Forget ``key`` (its file is gone)."""
        size = self._lru.pop(key, None)
        if size is not None:
            self.used -= size

    def _insert(self, key: str, size: int) -> None:
        self.remove(key)
        self._lru[key] = size
        self.used += size
        self._admission.fit(len(self._lru))

    def _evict(self, newcomer: str | None) -> list[str]:
        """Evict LRU keys until within budget; the policy may pick ``newcomer`` instead.

        TinyLFU's admission: the newcomer displaces the LRU victim only if it was read
        more often; otherwise the newcomer itself leaves (its reader already has its bytes).
        """
        evicted = []
        while self.used > self.capacity and self._lru:
            key = next(iter(self._lru))
            if newcomer not in (None, key) and self._admission.rejects(newcomer, key):
                key = newcomer
            if key == newcomer:
                newcomer = None  # compared once, as TinyLFU does
            self.remove(key)
            evicted.append(key)
        return evicted
