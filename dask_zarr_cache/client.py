"""Client-side verbs: ``cluster_stats``, ``cached`` (what of a dataset is cached) and ``evict``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zarr.core.sync

from dask_zarr_cache.core.exceptions import ZarrCacheError
from dask_zarr_cache.core.protocol import pack
from dask_zarr_cache.datasets import named_objects
from dask_zarr_cache.identity.keys import validate_key
from dask_zarr_cache.identity.stores import SourceLocation
from dask_zarr_cache.observe.coverage import CacheStatus, VariableStatus, cache_keys_of, status_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from distributed import Client

    from dask_zarr_cache.store import ClusterCacheStore

__all__ = [
    "CacheStatus",
    "EvictReport",
    "VariableStatus",
    "cached",
    "cached_keys",
    "cluster_stats",
    "evict",
]

_NOT_REGISTERED = (
    "ZarrCachePlugin is not registered on this cluster; call "
    "client.register_plugin(ZarrCachePlugin(...)) first"
)


def cluster_stats(client: Client) -> dict[str, Any]:
    """Return the cache counters of every worker and their totals.

    Parameters
    ----------
    client : distributed.Client
        A client of a cluster where :class:`~dask_zarr_cache.ZarrCachePlugin` is
        registered.

    Returns
    -------
    dict
        ``{"total": {...}, "workers": {address: {...}}, "index": {...}}``: totals and
        per-worker fields of :class:`~dask_zarr_cache.worker.counters.CacheCounters` (hits, misses,
        remote_reads, remote_bytes, peer_reads, peer_bytes, entries, bytes, evictions,
        expired, ...); the index's ``entries``, ``pending`` fetches, ``workers``
        (entries per worker) and ``shards`` (address, entries, pending, nbytes of each
        shard; ``None`` for one that did not answer), or ``None`` without an index.

    Raises
    ------
    ZarrCacheError
        If the plugin is not registered.

    """
    stats = client.sync(client.scheduler.zarr_cache_cluster_stats)
    if not isinstance(stats, dict):  # distributed answers None for an unknown handler
        raise ZarrCacheError(_NOT_REGISTERED)
    return stats


def cached_keys(client: Client, keys: Sequence[str]) -> list[bool]:
    """Whether the index knows a ready copy of each cache key on some worker.

    Raises
    ------
    ZarrCacheError
        If the plugin is not registered.

    """

    async def ask() -> str | None:
        return await client.scheduler.zarr_cache_cached(keys=json.dumps(list(keys)))

    reply = client.sync(ask)
    if reply is None:
        raise ZarrCacheError(_NOT_REGISTERED)
    return [c == "1" for c in reply]


# -- status --------------------------------------------------------------------------------
def cached(
    client: Client, store: ClusterCacheStore, variables: Sequence[str] | None = None
) -> CacheStatus:
    """Report how much of a dataset the cluster caches, per variable.

    Lists the dataset's stored objects from its metadata and one listing of the source,
    and asks the index which of them a worker holds.

    Parameters
    ----------
    client : distributed.Client
        Reaches the cluster (where the plugin is registered).
    store : ClusterCacheStore
        The dataset: a group, or one array.
    variables : list of str, optional
        Names (or paths) of the arrays to report; default all.

    Raises
    ------
    ZarrCacheError
        If the plugin is not registered, or a named variable is not there.

    """
    objects = named_objects(store, variables)
    keys = cache_keys_of(objects)
    return status_of(objects, dict(zip(keys, cached_keys(client, keys), strict=True)))


# -- evict ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvictReport:
    """What :func:`evict` dropped: in all, and per worker (``{"objects", "bytes"}``)."""

    objects: int
    bytes: int
    workers: dict[str, dict[str, int]]
    unreached: list[str]  #: workers that did not answer; they drop it when they catch up

    def __str__(self) -> str:
        text = (
            f"evicted {self.objects} objects ({self.bytes / 2**20:.1f} MiB) "
            f"from {len(self.workers)} workers"
        )
        return text + (f"; {len(self.unreached)} did not answer" if self.unreached else "")


def evict(client: Client, store: ClusterCacheStore, prefix: str = "") -> EvictReport:
    """Drop a dataset's cached objects (or those below ``prefix``) across the cluster.

    The source is not touched.  An eviction takes the path of a write that changed no
    byte: fetches in flight are not kept, and a worker away now drops the objects when
    it catches up.  The next read fetches from the source again, once.

    Parameters
    ----------
    client : distributed.Client
        A client of a cluster with :class:`~dask_zarr_cache.ZarrCachePlugin`.
    store : ClusterCacheStore
        The data.
    prefix : str
        A key prefix below the store's root (e.g. ``"temperature"``); ``""``: all.

    Raises
    ------
    ZarrCacheError
        If the plugin is not registered.
    InvalidCacheKeyError
        If ``prefix`` is not a zarr key prefix.

    """
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
    if isinstance(store.location, SourceLocation):
        keys, prefixes = [], [store.location.prefix(prefix)]
    else:  # objects named by what they point to (references): one by one
        keys = [c for k in _listed(store, prefix) if (c := store.cache_key(k)) is not None]
        prefixes = []

    async def send() -> dict[str, Any] | None:
        return await client.scheduler.zarr_cache_evict(keys=pack(keys), prefixes=pack(prefixes))

    reply = client.sync(send)
    if not isinstance(reply, dict):
        raise ZarrCacheError(_NOT_REGISTERED)
    return EvictReport(reply["objects"], reply["bytes"], reply["workers"], reply["unreached"])


def _listed(store: ClusterCacheStore, prefix: str) -> list[str]:
    async def listing() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return zarr.core.sync.sync(listing())
