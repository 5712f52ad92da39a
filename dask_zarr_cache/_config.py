"""Settings of the cache: validation, size parsing and dask config defaults.

Settings come from the ``ZarrCachePlugin`` arguments; arguments left as ``None`` fall back
to dask config (``zarr-cache.max-size`` etc., i.e. ``DASK_ZARR_CACHE__MAX_SIZE`` in the
environment).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import dask.config
from dask.utils import parse_bytes

from dask_zarr_cache._exceptions import CacheConfigError

__all__ = ["CacheSettings"]

dask.config.update_defaults(
    {
        "zarr-cache": {
            "max-size": "10GiB",
            "max-age-seconds": None,
            "directory": None,
            # How often a worker flushes its batched access records to the index.
            "flush-interval": "1s",
        }
    }
)


def _parse_max_size(value: int | str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CacheConfigError(
            f"max_size must be an int number of bytes or a size string like '2GiB', got {value!r}"
        )
    if isinstance(value, str):
        if not value.strip():
            raise CacheConfigError("max_size is an empty string; give a size like '2GiB'")
        try:
            value = parse_bytes(value)
        except (ValueError, TypeError) as err:
            raise CacheConfigError(f"max_size {value!r} is not a size like '2GiB'") from err
    if value <= 0:
        raise CacheConfigError(f"max_size must be positive, got {value!r} bytes")
    return int(value)


def _parse_max_age(value: float | int | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as err:
            raise CacheConfigError(f"max_age_seconds {value!r} is not a number") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CacheConfigError(f"max_age_seconds must be a number or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise CacheConfigError(f"max_age_seconds must be positive and finite, got {value!r}")
    return float(value)


def _parse_directory(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise CacheConfigError(f"directory must be a path string or None, got {value!r}")
    return value


@dataclass(frozen=True)
class CacheSettings:
    """Validated settings of one cluster cache.

    Parameters
    ----------
    max_size : int
        Bytes of cached objects each worker may keep on its local disk.
    max_age_seconds : float or None
        Time to live of a cached object; ``None`` means objects never expire.
    directory : str or None
        Parent directory of the worker caches; ``None`` means
        ``<worker.local_directory>/zarr-cache``.

    """

    max_size: int
    max_age_seconds: float | None = None
    directory: str | None = None

    @classmethod
    def from_arguments(
        cls,
        max_size: int | str | None = None,
        max_age_seconds: float | int | str | None = None,
        directory: str | os.PathLike[str] | None = None,
    ) -> CacheSettings:
        """Validate user arguments; ``None`` falls back to dask config ``zarr-cache.*``.

        Raises
        ------
        CacheConfigError
            If a value is malformed, non-positive or of the wrong type.

        """
        if max_size is None:
            max_size = dask.config.get("zarr-cache.max-size")
        if max_age_seconds is None:
            max_age_seconds = dask.config.get("zarr-cache.max-age-seconds")
        if directory is None:
            directory = dask.config.get("zarr-cache.directory")
        return cls(
            max_size=_parse_max_size(max_size),
            max_age_seconds=_parse_max_age(max_age_seconds),
            directory=_parse_directory(directory),
        )
