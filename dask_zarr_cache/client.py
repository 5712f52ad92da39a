"""Client-side helpers: ``cluster_stats``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.exceptions import ZarrCacheError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["cluster_stats"]

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
