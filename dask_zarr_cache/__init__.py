"""dask-zarr-cache: one shared cache of Zarr chunks for a whole Dask cluster."""

from __future__ import annotations

from dask_zarr_cache.client import CacheStatus, EvictReport, cached, cluster_stats, evict
from dask_zarr_cache.core.exceptions import (
    CacheConfigError,
    CacheDirectoryError,
    InvalidationError,
    InvalidCacheKeyError,
    ZarrCacheError,
)
from dask_zarr_cache.plugin import ZarrCachePlugin
from dask_zarr_cache.store import ClusterCacheStore
from dask_zarr_cache.warmup import WarmJob, WarmReport, warm

__all__ = [
    "CacheConfigError",
    "CacheDirectoryError",
    "CacheStatus",
    "ClusterCacheStore",
    "EvictReport",
    "InvalidCacheKeyError",
    "InvalidationError",
    "WarmJob",
    "WarmReport",
    "ZarrCacheError",
    "ZarrCachePlugin",
    "cached",
    "cluster_stats",
    "evict",
    "warm",
]

__version__ = "0.2.0"
