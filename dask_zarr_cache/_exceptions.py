"""Domain exceptions of dask-zarr-cache."""

from __future__ import annotations

__all__ = ["CacheConfigError", "InvalidCacheKeyError", "ZarrCacheError"]


class ZarrCacheError(Exception):
    """Base class of every error raised by dask-zarr-cache."""


class CacheConfigError(ZarrCacheError, ValueError):
    """A plugin or store setting is invalid (bad size, negative TTL, ...)."""


class InvalidCacheKeyError(ZarrCacheError, ValueError):
    """A store key could escape the cache directory or is not a valid zarr key."""
