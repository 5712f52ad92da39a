"""``ClusterCacheStore``: a zarr store that reads through the cluster cache."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from zarr.abc.store import Store
from zarr.storage import WrapperStore

from dask_zarr_cache._exceptions import ZarrCacheError
from dask_zarr_cache._keys import cache_key, namespace_of, validate_key
from dask_zarr_cache._scheduler import run_on_scheduler
from dask_zarr_cache._worker import worker_cache

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Iterable

    from zarr.abc.buffer import Buffer
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import BufferPrototype

__all__ = ["ClusterCacheStore"]

logger = logging.getLogger(__name__)


class ClusterCacheStore(WrapperStore[Store]):
    """A zarr store whose reads go through the Dask cluster's shared chunk cache.

    Inside a task on a worker where :class:`~dask_zarr_cache.ZarrCachePlugin` is
    installed, each object is read from the source at most once cluster-wide (while it
    stays cached) and otherwise served from a worker's disk.  Anywhere else (the client
    process, a worker without the plugin) reads go straight to the source.  Writes go to
    the source first and then invalidate the key on every worker.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The source store (``FsspecStore``, ``LocalStore``, ``MemoryStore``, ...).
    namespace : str, optional
        Cache namespace of the source; by default a stable token of the source's
        identity, so different sources never share entries.

    Examples
    --------
    >>> store = ClusterCacheStore(FsspecStore.from_url("s3://bucket/data.zarr"))  # doctest: +SKIP
    >>> da.from_zarr(zarr.open_array(store, mode="r"))  # doctest: +SKIP

    """

    def __init__(self, store: Store, *, namespace: str | None = None) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"ClusterCacheStore wraps a zarr Store, got {type(store).__name__}")
        super().__init__(store)
        self.namespace = namespace if namespace is not None else namespace_of(store)

    def _with_store(self, store: Store) -> ClusterCacheStore:
        return type(self)(store, namespace=self.namespace)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ClusterCacheStore)
            and self.namespace == other.namespace
            and self._store == other._store
        )

    __hash__ = None  # type: ignore[assignment]  # mutable like the stores it wraps

    def __repr__(self) -> str:
        return f"ClusterCacheStore({self._store!r})"

    def __str__(self) -> str:
        return f"cluster-cache::{self._store}"

    # -- reads -------------------------------------------------------------------------
    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """Read ``key`` (or a byte range of it) through the cluster cache.

        Raises
        ------
        InvalidCacheKeyError
            If ``key`` is absolute or has ``..``, empty components or control characters.

        """
        ckey = cache_key(self.namespace, key, byte_range)
        cache = worker_cache() if ckey is not None else None
        if cache is None:
            return await self._store.get(key, prototype, byte_range)

        async def read_source() -> bytes | None:
            buf = await self._store.get(key, prototype, byte_range)
            return None if buf is None else buf.to_bytes()

        data = await cache.get(ckey, read_source)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        """Read several keys or byte ranges, each through :meth:`get`."""
        return list(
            await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges))
        )

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def getsize(self, key: str) -> int:
        """Size of ``key`` as the source reports it (no read of the object)."""
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        """Total size below ``prefix`` as the source reports it."""
        return await self._store.getsize_prefix(prefix)

    # -- writes: source first, then invalidate cluster-wide --------------------------------------
    async def set(self, key: str, value: Buffer) -> None:
        """Write ``key`` to the source, then drop every cached copy of it."""
        validate_key(key)
        await self._store.set(key, value)
        await self._invalidate(keys=[key])

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Write ``key`` to the source unless it exists; drop cached copies."""
        validate_key(key)
        await self._store.set_if_not_exists(key, value)
        await self._invalidate(keys=[key])

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        values = list(values)
        for key, _ in values:
            validate_key(key)
        await self._store._set_many(values)
        await self._invalidate(keys=[key for key, _ in values])

    async def delete(self, key: str) -> None:
        """Delete ``key`` from the source, then drop every cached copy of it."""
        validate_key(key)
        await self._store.delete(key)
        await self._invalidate(keys=[key])

    async def delete_dir(self, prefix: str) -> None:
        """Delete everything below ``prefix`` from the source and the cache."""
        await self._store.delete_dir(prefix)
        prefix = prefix.strip("/")
        await self._invalidate(prefixes=[f"{prefix}/" if prefix else ""])

    async def clear(self) -> None:
        """Clear the source and drop this namespace from the cache."""
        await self._store.clear()
        await self._invalidate(prefixes=[""])

    async def _invalidate(self, keys: Iterable[str] = (), prefixes: Iterable[str] = ()) -> None:
        """Drop cached copies of ``keys`` and of everything under ``prefixes`` cluster-wide."""
        context = _cluster_context()
        if context is None:
            return  # no cluster reachable from here: nothing can hold cached copies we know of
        loop, scheduler = context
        ckeys = "\n".join(f"{self.namespace}/{k}" for k in keys)
        cprefixes = "\n".join(f"{self.namespace}/{p}" for p in prefixes)
        future = asyncio.run_coroutine_threadsafe(
            run_on_scheduler(scheduler, "invalidate", keys=ckeys, prefixes=cprefixes), loop
        )
        try:
            await asyncio.wrap_future(future)
        except Exception as err:
            raise ZarrCacheError(_INVALIDATION_FAILED.format(err=err)) from err


_INVALIDATION_FAILED = (
    "the write reached the source store, but invalidating cached copies on the cluster "
    "failed ({err}); workers may serve the old bytes until they expire"
)


def _cluster_context() -> tuple[asyncio.AbstractEventLoop, Any] | None:
    """The event loop and scheduler rpc of the worker or client this code runs under."""
    from distributed import default_client, get_worker

    try:
        worker = get_worker()
    except ValueError:
        pass
    else:
        return worker.loop.asyncio_loop, worker.scheduler
    try:
        client = default_client()
    except ValueError:
        return None
    return client.loop.asyncio_loop, client.scheduler
