"""``ClusterCacheStore``: a zarr store that reads through the cluster cache."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from zarr.abc.store import OffsetByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from dask_zarr_cache.core.exceptions import CacheConfigError, InvalidationError
from dask_zarr_cache.core.lookup import cache_of, worker_cache
from dask_zarr_cache.identity.keys import validate_namespace
from dask_zarr_cache.identity.stores import SourceLocation, declared_immutable, source_identity
from dask_zarr_cache.writes.announce import announce_write

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Sequence

    from zarr.abc.buffer import Buffer
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import BufferPrototype

    from dask_zarr_cache.core.interfaces import CacheKeeper
    from dask_zarr_cache.core.protocol import WriteReply

__all__ = ["ClusterCacheStore"]

logger = logging.getLogger(__name__)


class ClusterCacheStore(WrapperStore[Store]):
    """A zarr store whose reads go through the Dask cluster's shared chunk cache.

    Inside a task on a worker where :class:`~dask_zarr_cache.ZarrCachePlugin` is
    installed, each object is read from the source at most once cluster-wide (while it
    stays cached) and otherwise served from a worker's disk.  Anywhere else (the client
    process, a worker without the plugin) reads go straight to the source.  Writes go to
    the source first and return once no worker can serve the bytes they replaced.

    Objects are cached under where their bytes live (storage endpoint + full path; an
    Icechunk snapshot; the file and byte range a reference points to), so every store
    opened on the same data shares cache entries and invalidations, whatever its class,
    credentials, ``read_only`` flag or root (see :mod:`dask_zarr_cache.identity.stores`).

    Parameters
    ----------
    store : zarr.abc.store.Store
        The source store (``FsspecStore``, ``ObjectStore``, ``LocalStore``, ``ZipStore``,
        ``MemoryStore``, an Icechunk session's store, VirtualiZarr's ``ManifestStore``, ...).
    namespace : str, optional
        Name of the source's data in the cache, for stores whose location the cache cannot
        know (it says so); stores given the same namespace share entries.  It promises that
        the data does not change under that name except through the cache: versioned data
        needs a new namespace per version.
    immutable : bool
        Declare that the data never changes (a published, versioned dataset): its cached
        objects never expire, and a new cluster on the same disks keeps them without
        asking the source.  They are kept apart from those of the same data read without
        the declaration, and only writes through an ``immutable=True`` store reach them.

    Raises
    ------
    CacheConfigError
        If ``namespace`` is invalid, needed and not given, or given for a store that names
        its own versions (Icechunk); or ``immutable`` is given for a store the cache does
        not name by location (references, a writable Icechunk session).

    Examples
    --------
    >>> store = ClusterCacheStore(FsspecStore.from_url("s3://bucket/data.zarr"))  # doctest: +SKIP
    >>> da.from_zarr(zarr.open_array(store, mode="r"))  # doctest: +SKIP

    """

    def __init__(
        self, store: Store, *, namespace: str | None = None, immutable: bool = False
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"ClusterCacheStore wraps a zarr Store, got {type(store).__name__}")
        super().__init__(store)
        if namespace is not None:
            namespace = validate_namespace(namespace)
        location = source_identity(store, namespace)
        self.location = declared_immutable(location) if immutable else location

    @classmethod
    def from_url(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        read_only: bool = True,
        *,
        namespace: str | None = None,
        immutable: bool = False,
    ) -> ClusterCacheStore:
        """Open the data at ``url`` (any fsspec URL zarr accepts, or a local path) cached.

        Examples
        --------
        >>> xr.open_zarr(ClusterCacheStore.from_url("s3://bucket/data.zarr"))  # doctest: +SKIP

        """
        if "://" in url or "::" in url:
            source: Store = FsspecStore.from_url(
                url, storage_options=storage_options, read_only=read_only
            )
        elif storage_options:
            raise CacheConfigError("storage_options are only used with fsspec URLs")
        else:
            source = LocalStore(url, read_only=read_only)
        return cls(source, namespace=namespace, immutable=immutable)

    @property
    def namespace(self) -> str:
        """The cache namespace of the source (its storage system, or the given name)."""
        return self.location.namespace

    def cache_key(self, key: str, byte_range: ByteRequest | None = None) -> str | None:
        """The cache key of a read of ``key``; ``None`` if such a read is not cached.

        Raises
        ------
        InvalidCacheKeyError
            If ``key`` is absolute, holds NUL or has empty, ``.`` or ``..`` components.

        """
        return self.location.read_key(self._store, key, byte_range)

    def _with_store(self, store: Store) -> ClusterCacheStore:
        new = type(self).__new__(type(self))
        WrapperStore.__init__(new, store)
        new.location = self.location
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self._store, "location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        WrapperStore.__init__(self, state["store"])
        self.location = state["location"]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ClusterCacheStore)
            and self.location == other.location
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
            If ``key`` is absolute, holds NUL or has empty, ``.`` or ``..`` components.

        """
        if key == "":  # the root itself: not an object the cache names
            return await self._store.get(key, prototype, byte_range)
        ckey = self.cache_key(key, byte_range)
        cache = worker_cache() if ckey is not None else None
        if ckey is None or cache is None:
            return await self._store.get(key, prototype, byte_range)
        if isinstance(self.location, SourceLocation):  # files of an earlier cluster: checked
            await cache.settle(self.location.prefix(""), self._store, self)

        source_range = byte_range
        if (
            byte_range is None
            and isinstance(self.location, SourceLocation)
            and isinstance(_unwrapped(self._store), FsspecStore)
        ):
            # For a whole object s3fs sends HEAD (to split big objects) and then GET: two
            # round trips. "From byte 0" is the same bytes in one GET.
            source_range = OffsetByteRequest(0)

        async def read_source() -> bytes | None:
            try:
                buf = await self._store.get(key, prototype, source_range)
            except Exception:
                if source_range is byte_range:
                    raise
                # A server may refuse the range (HTTP 416 for an empty object, say): the
                # plain read decides, as it would without the cache.
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

    async def get_ranges(
        self,
        key: str,
        byte_ranges: Sequence[ByteRequest | None],
        *,
        prototype: BufferPrototype,
        max_concurrency: int | None = None,
        max_gap_bytes: int | None = None,
        max_coalesced_bytes: int | None = None,
    ) -> AsyncIterator[Sequence[tuple[int, Buffer | None]]]:
        """Read many byte ranges of ``key`` (zarr >= 3.2 reads parts of shards this way).

        zarr's own coalescing (``Store.get_ranges``) merges nearby ranges and reads each
        merged range through :meth:`get`, so through the cache; ``None`` keeps zarr's
        default for a setting.  ``WrapperStore``'s version would go straight to the source.
        """
        given = {
            "max_concurrency": max_concurrency,
            "max_gap_bytes": max_gap_bytes,
            "max_coalesced_bytes": max_coalesced_bytes,
        }
        settings = {name: value for name, value in given.items() if value is not None}
        # zarr >= 3.2 (this method is not called on zarr 3.1, which has no get_ranges)
        async for group in Store.get_ranges(  # type: ignore[attr-defined,unused-ignore]
            self, key, byte_ranges, prototype=prototype, **settings
        ):
            yield group

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    # -- zarr's synchronous store API (zarr >= 3.2) --------------------------------------
    @property
    def _supports_sync_io(self) -> bool:
        # zarr's synchronous codec pipeline would call the *_sync methods from its own
        # threads for every chunk; the cache's reads hop event loops, so zarr keeps to the
        # asynchronous methods (the same cache, without a thread per chunk).
        return False

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """:meth:`get`, for callers of zarr's synchronous store API (through the cache)."""
        return sync(self.get(key, prototype or default_buffer_prototype(), byte_range))

    def set_sync(self, key: str, value: Buffer) -> None:
        """:meth:`set` from synchronous code: returns once the cluster dropped old copies."""
        sync(self.set(key, value))

    def delete_sync(self, key: str) -> None:
        """:meth:`delete` from synchronous code: returns once the cluster dropped copies."""
        sync(self.delete(key))

    async def getsize(self, key: str) -> int:
        """Size of ``key`` as the source reports it (no read of the object)."""
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        """Total size below ``prefix`` as the source reports it."""
        return await self._store.getsize_prefix(prefix)

    # -- writes: source first, then invalidate cluster-wide --------------------------------------
    async def set(self, key: str, value: Buffer) -> None:
        """Write ``key`` to the source, then drop every cached copy of it."""
        await self._write([key], [], self._store.set(key, value), {key: value})

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Write ``key`` to the source unless it exists; drop cached copies."""
        await self._write([key], [], self._store.set_if_not_exists(key, value))

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        values = list(values)
        await self._write([k for k, _ in values], [], self._store._set_many(values), dict(values))

    async def delete(self, key: str) -> None:
        """Delete ``key`` from the source, then drop cached copies of it."""
        # LocalStore deletes a whole directory for a key that names one: drop below it too.
        below = [key] if isinstance(_unwrapped(self._store), LocalStore) else []
        await self._write([key], below, self._store.delete(key))

    async def delete_dir(self, prefix: str) -> None:
        """Delete everything below ``prefix`` from the source and the cache."""
        await self._write([], [prefix], self._store.delete_dir(prefix))

    async def clear(self) -> None:
        """Clear the source and drop its objects from the cache."""
        await self._write([], [""], self._store.clear())

    async def _write(
        self,
        keys: list[str],
        prefixes: list[str],
        write: Any,
        values: dict[str, Buffer] | None = None,
    ) -> None:
        """Run the source ``write`` (a coroutine), then invalidate cluster-wide.

        ``values``: the bytes written, by key (``set``); with ``cache_writes`` the worker
        this runs on keeps them, at the write's place in the history.

        Raises
        ------
        InvalidCacheKeyError
            Before anything is written, for a key that is not a zarr key.
        InvalidationError
            After the source was written, if the cluster could not be told.

        """
        try:
            ckeys, cprefixes = self.location.written(keys, prefixes)  # validates each key
        except BaseException:
            write.close()
            raise
        keeper = worker_cache() if values and ckeys else None
        if keeper is not None and not keeper.keeps_writes:
            keeper = None
        # Where this worker stood before the bytes reached the source (see keep_written).
        since = keeper.position() if keeper is not None else None
        await write
        if not ckeys and not cprefixes:
            return  # nothing of this source can be cached
        try:
            announced = await announce_write(ckeys, cprefixes)
        except Exception as err:
            raise InvalidationError(_INVALIDATION_FAILED.format(err=err)) from err
        if keeper is not None and values and since is not None:  # cache_writes, in a task
            for worker, reply in announced:
                if worker is not None and cache_of(worker) is keeper:
                    self._keep_written(keeper, values, set(ckeys), reply, since)

    def _keep_written(
        self,
        cache: CacheKeeper,
        values: dict[str, Buffer],
        replaced: Collection[str],
        reply: WriteReply,
        since: tuple[bytes | None, int],
    ) -> None:
        """Hand the written bytes to this worker's cache (``cache_writes``), to keep beside."""
        for key, value in values.items():
            ckey = self.cache_key(key)
            if ckey is not None and ckey in replaced:  # the very object the write replaced
                cache.keep_written(ckey, value.to_bytes(), reply, since)


_INVALIDATION_FAILED = (
    "the write reached the source store, but the cluster's cache could not be told ({err}); "
    "workers may serve the old bytes until they expire"
)


def _unwrapped(store: Store) -> Store:
    """The innermost store below any wrappers."""
    while isinstance(store, WrapperStore):
        store = store._store
    return store
