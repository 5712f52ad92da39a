"""Which objects a dataset has: its arrays, their chunk (or shard) keys, their sizes.

Read from the source's metadata and one listing of the source; shared by ``warm`` and
``cached``.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import TYPE_CHECKING, Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from dask_zarr_cache.core.exceptions import ZarrCacheError
from dask_zarr_cache.observe.coverage import NamedObjects

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from dask_zarr_cache.store import ClusterCacheStore

__all__ = ["array_objects", "named_objects", "object_sizes", "select_arrays"]


def object_sizes(
    store: ClusterCacheStore,
    variables: Sequence[str] | None = None,
    selection: Mapping[str, slice] | None = None,
) -> dict[str, int]:
    """Keys and source sizes of the stored objects (chunks or shards) of the arrays.

    Objects that do not exist at the source (never written: fill value) are left out.
    """
    return {
        k: n
        for objects in array_objects(store, variables, selection).values()
        for k, n in objects.items()
    }


def array_objects(
    store: ClusterCacheStore,
    variables: Sequence[str] | None = None,
    selection: Mapping[str, slice] | None = None,
) -> dict[str, dict[str, int]]:
    """:func:`object_sizes` by array path (``variables`` as in :func:`select_arrays`)."""
    arrays = select_arrays(store, variables)
    existing = _source_sizes(store._store)
    return {
        a.path: {k: existing[k] for k in _array_keys(a, selection or {}) if k in existing}
        for a in arrays
    }


def named_objects(store: ClusterCacheStore, variables: Sequence[str] | None = None) -> NamedObjects:
    """:func:`array_objects` with each object's cache key (``None``: not cached by name)."""
    return {
        path: {k: (store.cache_key(k), n) for k, n in sizes.items()}
        for path, sizes in array_objects(store, variables).items()
    }


def select_arrays(
    store: ClusterCacheStore, variables: Sequence[str] | None = None
) -> list[zarr.Array]:
    """The arrays of ``store`` (a group or one array), or those named in ``variables``.

    Reads metadata only.

    Raises
    ------
    ZarrCacheError
        If a named variable is not there.

    """
    node = zarr.open(store._store, mode="r")
    if isinstance(node, zarr.Array):
        arrays = [node]
    else:
        arrays = [a for _, a in node.members(max_depth=None) if isinstance(a, zarr.Array)]
    if variables is not None:
        wanted = set(variables)
        arrays = [a for a in arrays if a.path in wanted or a.basename in wanted]
        missing = wanted - {a.path for a in arrays} - {a.basename for a in arrays}
        if missing:
            raise ZarrCacheError(f"no such variables in {store}: {sorted(missing)}")
    return arrays


def _array_keys(arr: zarr.Array, selection: Mapping[str, slice]) -> list[str]:
    grid = arr.shards or arr.chunks
    dims = _dimension_names(arr)
    ranges = []
    for size, step, dim in zip(arr.shape, grid, dims, strict=True):
        window = selection.get(dim, slice(None)) if dim else slice(None)
        lo, hi, _ = window.indices(size)
        ranges.append(range(lo // step, math.ceil(hi / step)) if hi > lo else range(0))
    prefix = f"{arr.path}/" if arr.path else ""
    encode = arr.metadata.encode_chunk_key
    return [prefix + encode(coords) for coords in itertools.product(*ranges)]


def _dimension_names(arr: zarr.Array) -> list[str | None]:
    names: Any = getattr(arr.metadata, "dimension_names", None)
    if names is None:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")  # zarr v2 written by xarray
    return list(names) if names else [None] * arr.ndim


def _source_sizes(source: Any) -> dict[str, int]:
    """Every object of the source with its size, in one listing where the store allows."""
    if isinstance(source, FsspecStore):
        root = source.path.rstrip("/")
        found = zarr.core.sync.sync(source.fs._find(root, detail=True))
        return {p[len(root) + 1 :]: int(info["size"]) for p, info in found.items()}
    if isinstance(source, LocalStore):
        root = str(source.root)
        return {
            os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"): os.path.getsize(
                os.path.join(d, f)
            )
            for d, _, files in os.walk(root)
            for f in files
        }

    async def listing() -> dict[str, int]:
        return {k: await source.getsize(k) async for k in source.list()}

    return zarr.core.sync.sync(listing())
