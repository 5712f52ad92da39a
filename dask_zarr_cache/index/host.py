"""Index shards hosted by workers: one handler per index operation, no task thread.

A shard is a :class:`~dask_zarr_cache.index.shard.CacheIndex` living in a worker process, in
that worker's :class:`IndexHost` (``worker.extensions["zarr_cache_index"]``).  The
scheduler creates a shard with the handler ``zarr_cache_index_create`` and callers
(:class:`~dask_zarr_cache.index.client.IndexClient`) reach it with one handler per
operation, each registered to the method of the same name.  Every method runs on the
worker's event loop and returns at once: creating a shard never waits for a free task
thread (a Dask Actor's constructor does, behind whatever tasks occupy the threads), and a
worker hosting shards can be retired like any other.  Batches arrive and leave packed
with :func:`~dask_zarr_cache.core.protocol.pack`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.exceptions import ZarrCacheError
from dask_zarr_cache.core.protocol import pack, unpack
from dask_zarr_cache.index.shard import CacheIndex

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["INDEX_HOST_NAME", "IndexHost", "UnknownShardError"]

#: Key of the host in ``worker.extensions``.
INDEX_HOST_NAME = "zarr_cache_index"


class UnknownShardError(ZarrCacheError):
    """No shard of that name lives here (it was dropped, or its worker restarted)."""


class IndexHost:
    """The index shards one worker hosts, by the name the scheduler gave each.

    Installed once per worker process; it outlives the worker cache (the plugin may be
    registered again while the shards keep their entries).
    """

    def __init__(self) -> None:
        self.shards: dict[str, CacheIndex] = {}

    @property
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Worker handlers by name: each the method of the same name."""
        return {
            "zarr_cache_index_create": self.zarr_cache_index_create,
            "zarr_cache_index_drop": self.zarr_cache_index_drop,
            "zarr_cache_index_configure": self.zarr_cache_index_configure,
            "zarr_cache_index_register": self.zarr_cache_index_register,
            "zarr_cache_index_add": self.zarr_cache_index_add,
            "zarr_cache_index_remove_worker": self.zarr_cache_index_remove_worker,
            "zarr_cache_index_exchange": self.zarr_cache_index_exchange,
            "zarr_cache_index_abandon": self.zarr_cache_index_abandon,
            "zarr_cache_index_touch": self.zarr_cache_index_touch,
            "zarr_cache_index_invalidate": self.zarr_cache_index_invalidate,
            "zarr_cache_index_cached": self.zarr_cache_index_cached,
            "zarr_cache_index_summary": self.zarr_cache_index_summary,
        }

    def _shard(self, shard: str) -> CacheIndex:
        try:
            return self.shards[shard]
        except KeyError:
            raise UnknownShardError(f"no zarr cache index shard {shard} here") from None

    # -- lifecycle (the scheduler) ---------------------------------------------------------
    async def zarr_cache_index_create(
        self, shard: str, max_age_seconds: float | None, policy: str, pending_timeout: float
    ) -> None:
        """Host a new, empty shard named ``shard``."""
        self.shards[shard] = CacheIndex(
            max_age_seconds, policy=policy, pending_timeout=pending_timeout
        )

    async def zarr_cache_index_drop(self, shard: str) -> None:
        """Stop hosting ``shard`` (it moved elsewhere)."""
        self.shards.pop(shard, None)

    async def zarr_cache_index_configure(
        self, shard: str, max_age_seconds: float | None, policy: str
    ) -> None:
        """Apply new settings (plugin registered again)."""
        index = self._shard(shard)
        index.max_age_seconds = max_age_seconds
        index.policy = policy

    # -- operations (workers and the scheduler) ----------------------------------------------
    async def zarr_cache_index_register(
        self, shard: str, worker: str, files: bytes, first: bool, last: bool
    ) -> bytes:
        """See :meth:`CacheIndex.register`."""
        return pack(self._shard(shard).register(worker, unpack(files), first, last))

    async def zarr_cache_index_add(self, shard: str, worker: str, files: bytes) -> bytes:
        """See :meth:`CacheIndex.add`."""
        return pack(self._shard(shard).add(worker, unpack(files)))

    async def zarr_cache_index_remove_worker(self, shard: str, worker: str) -> int:
        """See :meth:`CacheIndex.remove_worker`."""
        return self._shard(shard).remove_worker(worker)

    async def zarr_cache_index_exchange(
        self, shard: str, worker: str, digests: bytes, unreachable: list[Any], commits: bytes
    ) -> bytes:
        """:meth:`CacheIndex.commit` the ``commits``, then :meth:`CacheIndex.acquire`.

        Returns both replies; one message carries a worker's commits and its next misses.
        """
        index = self._shard(shard)
        rejected = index.commit(worker, unpack(commits))
        return pack((index.acquire(worker, unpack(digests), unreachable), rejected))

    async def zarr_cache_index_abandon(self, shard: str, worker: str, digests: bytes) -> None:
        """See :meth:`CacheIndex.abandon`."""
        self._shard(shard).abandon(worker, unpack(digests))

    async def zarr_cache_index_touch(self, shard: str, worker: str, dropped: bytes) -> bool:
        """See :meth:`CacheIndex.touch`."""
        return self._shard(shard).touch(worker, unpack(dropped))

    async def zarr_cache_index_invalidate(self, shard: str, digests: bytes) -> int:
        """See :meth:`CacheIndex.invalidate`; returns the number of entries dropped."""
        return self._shard(shard).invalidate(unpack(digests))

    async def zarr_cache_index_cached(self, shard: str, digests: bytes) -> bytes:
        """See :meth:`CacheIndex.cached`."""
        return pack(self._shard(shard).cached(unpack(digests)))

    async def zarr_cache_index_summary(self, shard: str) -> dict[str, object]:
        """Entries, pending fetches, keys decided and asks, and entries per worker."""
        index = self._shard(shard)
        return {
            "entries": len(index),
            "pending": index.pending_count,
            "decisions": index.decisions,
            "asks": index.asks,
            "workers": index.workers(),
            "nbytes": index.nbytes,
        }
