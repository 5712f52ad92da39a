"""What code outside the worker layer may call on a worker's cache: two typed seams.

The store reads through :class:`CacheReader` and keeps what a task wrote through
:class:`CacheKeeper`; the announcement of a write that cannot use the worker's loop applies
it through :class:`WriteApplier`.  :mod:`~dask_zarr_cache.core.lookup` finds the cache of
the running code and returns it as :class:`WorkerCacheAPI`, all three in one.  The worker
layer implements them (``worker.cache.WorkerCache``; the plugin binds the two statically).
Declared here, below every layer, so that neither the store nor the writes layer imports
the worker layer, and a type checker sees every call across the seam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dask_zarr_cache.core.protocol import Payload, WriteReply

__all__ = ["CacheKeeper", "CacheReader", "WorkerCacheAPI", "WriteApplier"]


class CacheReader(Protocol):
    """The read path of a worker's cache, as a store calls it."""

    async def get(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        """The bytes of cache key ``key``, read from ``read_source`` at most once cluster-wide."""
        ...

    async def settle(self, prefix: str, source: Any, dataset: Any) -> None:
        """Before the first read below ``prefix``: the cluster checks its earlier files."""
        ...


class CacheKeeper(Protocol):
    """What a store's write calls to keep the bytes a task wrote (``cache_writes``)."""

    @property
    def keeps_writes(self) -> bool:
        """Whether this cache keeps what tasks on its worker write (``cache_writes``)."""
        ...

    def position(self) -> tuple[bytes | None, int]:
        """Whose write history this worker follows, and up to which write it applied it."""
        ...

    def keep_written(
        self, key: str, data: bytes, reply: WriteReply, since: tuple[bytes | None, int]
    ) -> None:
        """Keep ``data``, written to ``key`` as the scheduler's ``reply`` numbered it."""
        ...


class WriteApplier(Protocol):
    """A write applied on this worker before the scheduler numbered it (no worker loop)."""

    async def drop_written(self, keys: list[str], prefixes: list[str]) -> None:
        """Drop what the write replaced, before it has a number."""
        ...

    def written(self, keys: list[str], prefixes: list[str], seq: int) -> None:
        """The write dropped by :meth:`drop_written` has number ``seq``."""
        ...


class WorkerCacheAPI(CacheReader, CacheKeeper, WriteApplier, Protocol):
    """A worker's cache, as everything outside the worker layer sees it."""
