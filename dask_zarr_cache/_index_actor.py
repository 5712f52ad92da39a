"""``IndexActor``: the Dask Actor shell around the index policy.

Batches (of key digests) arrive and leave packed with
:func:`~dask_zarr_cache._protocol.pack`; :class:`~dask_zarr_cache._index_client.IndexClient`
is the only caller.
"""

from __future__ import annotations

from dask_zarr_cache._index import CacheIndex
from dask_zarr_cache._protocol import pack, unpack

__all__ = ["IndexActor"]


class IndexActor:
    """The Dask Actor hosting the :class:`CacheIndex` of one index shard.

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

    async def register(
        self, worker: str, files: bytes, first: bool = True, last: bool = True
    ) -> bytes:
        """See :meth:`CacheIndex.register`."""
        return pack(self.index.register(worker, unpack(files), first, last))

    async def remove_worker(self, worker: str) -> int:
        """See :meth:`CacheIndex.remove_worker`."""
        return self.index.remove_worker(worker)

    async def exchange(
        self, worker: str, digests: bytes, unreachable: str, commits: bytes
    ) -> bytes:
        """:meth:`CacheIndex.commit` the ``commits``, then :meth:`CacheIndex.acquire`.

        Returns both replies; one message carries a worker's commits and its next misses.
        """
        rejected = self.index.commit(worker, unpack(commits))
        return pack((self.index.acquire(worker, unpack(digests), unreachable), rejected))

    async def abandon(self, worker: str, digests: bytes) -> None:
        """See :meth:`CacheIndex.abandon`."""
        self.index.abandon(worker, unpack(digests))

    async def touch(self, worker: str, dropped: bytes) -> bool:
        """See :meth:`CacheIndex.touch`."""
        return self.index.touch(worker, unpack(dropped))

    async def invalidate(self, digests: bytes) -> int:
        """See :meth:`CacheIndex.invalidate`; returns the number of entries dropped."""
        return self.index.invalidate(unpack(digests))

    async def cached(self, digests: bytes) -> bytes:
        """See :meth:`CacheIndex.cached`."""
        return pack(self.index.cached(unpack(digests)))

    async def summary(self) -> dict[str, object]:
        """Entries, pending fetches and per-worker budgets, for stats and tests."""
        return {
            "entries": len(self.index),
            "pending": self.index.pending_count,
            "workers": self.index.workers(),
            "nbytes": self.index.nbytes,
        }
