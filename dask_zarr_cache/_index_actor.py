"""``IndexActor``: the Dask Actor shell around the index policy.

Batches arrive and leave packed with :func:`~dask_zarr_cache._protocol.pack`;
:class:`~dask_zarr_cache._index_client.IndexClient` is the only caller.
"""

from __future__ import annotations

from dask_zarr_cache._index import CacheIndex
from dask_zarr_cache._protocol import pack, unpack

__all__ = ["IndexActor"]


class IndexActor:
    """The Dask Actor hosting the :class:`CacheIndex` of a cluster.

    Every method is ``async`` so it runs on the hosting worker's event loop (sync actor
    methods would share one thread).  Batches arrive and leave packed with
    :func:`~dask_zarr_cache._protocol.pack`; :class:`~dask_zarr_cache._index_client.IndexClient`
    is the only caller.

    Parameters
    ----------
    max_age_seconds : float or None
        TTL of entries.
    policy : {"tinylfu", "lru"}
        Replacement policy.

    """

    def __init__(self, max_age_seconds: float | None = None, policy: str = "tinylfu") -> None:
        self.index = CacheIndex(max_age_seconds, policy=policy)

    async def configure(self, max_age_seconds: float | None, policy: str) -> None:
        """Apply new settings (plugin registered again)."""
        self.index.max_age_seconds = max_age_seconds
        self.index.policy = policy

    async def register(self, worker: str, capacity: int, files: bytes) -> bytes:
        """See :meth:`CacheIndex.register`."""
        return pack(self.index.register(worker, capacity, unpack(files)))

    async def remove_worker(self, worker: str) -> int:
        """See :meth:`CacheIndex.remove_worker`."""
        return self.index.remove_worker(worker)

    async def acquire(self, worker: str, keys: bytes, unreachable: str = "") -> bytes:
        """See :meth:`CacheIndex.acquire`."""
        return pack(self.index.acquire(worker, unpack(keys), unreachable))

    async def commit(self, worker: str, capacity: int, items: bytes) -> bytes:
        """See :meth:`CacheIndex.commit`."""
        return pack(self.index.commit(worker, capacity, unpack(items)))

    async def abandon(self, worker: str, keys: bytes) -> None:
        """See :meth:`CacheIndex.abandon`."""
        self.index.abandon(worker, unpack(keys))

    async def touch(self, worker: str, accessed: bytes, dropped: bytes) -> bytes:
        """See :meth:`CacheIndex.touch`."""
        return pack(self.index.touch(worker, unpack(accessed), unpack(dropped)))

    async def invalidate(self, keys: bytes, prefixes: bytes) -> int:
        """See :meth:`CacheIndex.invalidate`; returns the number of entries dropped."""
        return len(self.index.invalidate(unpack(keys), unpack(prefixes)))

    async def cached(self, keys: bytes) -> bytes:
        """Whether each key has an entry (a ready copy on some worker)."""
        return pack([key in self.index for key in unpack(keys)])

    async def summary(self) -> dict[str, object]:
        """Entries, pending fetches and per-worker budgets, for stats and tests."""
        return {
            "entries": len(self.index),
            "pending": self.index.pending_count,
            "workers": self.index.workers(),
        }
