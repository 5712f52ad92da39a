"""The read paths compared, as stores that build themselves once per worker process.

Per-worker caches (zarr's ``CacheStore``, fsspec ``simplecache``, the local floor) must
live in each worker's own directory and be shared by all tasks of that worker, as a user
would set them up; :class:`PerProcessStore` pickles a factory and builds the store on first
use in each process.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from zarr.storage import FsspecStore, LocalStore, WrapperStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from zarr.abc.store import Store

_BUILT: dict[tuple[Any, ...], Store] = {}


class PerProcessStore(WrapperStore):
    """A store built by ``factory(*args)`` once per process (pickles to the factory)."""

    def __init__(self, factory: Callable[..., Store], *args: Any) -> None:
        self._factory = factory
        self._args = args

    @property
    def _store(self) -> Store:  # type: ignore[override]
        key = (self._factory.__name__, self._args, os.getpid())
        if key not in _BUILT:
            _BUILT[key] = self._factory(*self._args)
        return _BUILT[key]

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerProcessStore, (self._factory, *self._args))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerProcessStore) and (self._factory, self._args) == (
            other._factory,
            other._args,
        )

    __hash__ = None  # type: ignore[assignment]


def worker_dir(root: str, kind: str) -> str:
    """A directory of this process only."""
    path = os.path.join(root, kind, str(os.getpid()))
    os.makedirs(path, exist_ok=True)
    return path


def plain(url: str, options: tuple[tuple[str, Any], ...]) -> Store:
    """No cache: FsspecStore over s3fs (fsspec's default instance cache, as users have it)."""
    return FsspecStore.from_url(url, read_only=True, storage_options=dict(options))


def one_get(url: str, options: tuple[tuple[str, Any], ...]) -> Store:
    """No cache: zarr's ``ObjectStore`` over obstore's ``S3Store``, one GET per object, no HEAD.

    What a user who wants the fastest uncached read picks today; the cache's cold pass is
    measured against it.
    """
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    opts = dict(options)
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = S3Store(
        bucket,
        prefix=prefix,
        endpoint=opts["endpoint_url"],
        region="us-east-1",
        access_key_id=opts["key"],
        secret_access_key=opts["secret"],
        client_options={"allow_http": True},
    )
    return ObjectStore(store, read_only=True)


def zarr_cache_store(url: str, options: tuple[tuple[str, Any], ...], root: str) -> Store:
    """zarr's own ``CacheStore`` with a worker-local ``LocalStore`` cache."""
    from zarr.experimental.cache_store import CacheStore

    return CacheStore(plain(url, options), cache_store=LocalStore(worker_dir(root, "zarr")))


def fsspec_simplecache(url: str, options: tuple[tuple[str, Any], ...], root: str) -> Store:
    """fsspec's ``simplecache::s3://`` with a worker-local cache directory."""
    return FsspecStore.from_url(
        f"simplecache::{url}",
        read_only=True,
        storage_options={
            "s3": dict(options),
            "simplecache": {"cache_storage": worker_dir(root, "simplecache")},
        },
    )


def local_floor(root: str) -> Store:
    """The physical floor: the chunks already on this worker's disk, read with LocalStore."""
    return LocalStore(worker_dir(root, "floor"), read_only=True)
