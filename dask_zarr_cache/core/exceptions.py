"""Domain exceptions of dask-zarr-cache."""

from __future__ import annotations

__all__ = [
    "CacheConfigError",
    "CacheDirectoryError",
    "IndexUnavailableError",
    "InvalidCacheKeyError",
    "InvalidationError",
    "ZarrCacheError",
]


class ZarrCacheError(Exception):
    """Base class of every error raised by dask-zarr-cache."""


class CacheConfigError(ZarrCacheError, ValueError):
    """A plugin or store setting is invalid (bad size, negative TTL, namespace, ...)."""


class InvalidCacheKeyError(ZarrCacheError, ValueError):
    """A store key is not a zarr key (absolute, NUL, empty, ``.`` or ``..`` components)."""


class CacheDirectoryError(ZarrCacheError):
    """A cache directory cannot be used: somebody else's data, or in use by another worker."""


class IndexUnavailableError(ZarrCacheError):
    """An index shard does not exist yet, was lost, or did not answer."""


class InvalidationError(ZarrCacheError):
    """A write reached the source, but the cluster could not be told about it in time."""
