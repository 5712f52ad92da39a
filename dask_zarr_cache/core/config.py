"""Settings of the cache: validation, size parsing and dask config defaults.

Settings come from the ``ZarrCachePlugin`` arguments; arguments left as ``None`` fall back
to dask config (``zarr-cache.max-size`` etc., i.e. ``DASK_ZARR_CACHE__MAX_SIZE`` in the
environment).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

import dask.config
from dask.utils import parse_bytes, parse_timedelta

from dask_zarr_cache.core.exceptions import CacheConfigError
from dask_zarr_cache.core.loops import HOP_START_WAIT
from dask_zarr_cache.core.names import POLICIES

__all__ = ["CacheSettings", "worker_directory"]

dask.config.update_defaults(
    {
        "zarr-cache": {
            "max-size": "10GiB",
            "max-age-seconds": None,
            # Seconds after which a cached object is checked against its source (one
            # listing per directory) instead of thrown away; None: never.
            "revalidate-after": None,
            "directory": None,
            # Whether a chunk written through the cache from a worker is kept on that
            # worker, so the next read of it makes no GET.
            "cache-writes": True,
            # How often a worker catches up with the scheduler's write history (renewing
            # its lease), expires old files and reports dropped copies to the index.
            "flush-interval": "1s",
            # A worker serves its files only while it caught up with the write history
            # within this time; a write waits at most this long for a worker it cannot
            # reach (that worker serves nothing until it catches up).
            "write-lease": "10s",
            # Which objects stay when a worker's budget is full: "tinylfu" (an LRU victim
            # leaves only for a more frequently read newcomer; scan resistant) or "lru".
            "policy": "tinylfu",
            # Ask Dask to run each chunk read on the worker that holds that chunk (loosely).
            "locality": True,
            # Shards the index is split over (by key hash), each on its own worker when
            # there are enough.
            "index-shards": 1,
            # The longest a read waits for the rest of the cluster (the index, peers) in
            # all before it reads the source itself: what a frozen host costs a read.
            "read-timeout": "5s",
            # Mode of cache files (directories get the matching search bits), whatever the
            # umask: this user only. "0640" shares them with the group, deliberately.
            "file-mode": "0600",
            # Accept a cache directory whose parent other users may write to without the
            # sticky bit (a Kubernetes emptyDir or fsGroup volume, written only by the
            # pod's own containers). Such users could swap the cache's directory.
            "trusted-parent": False,
            # Bytes of small objects each worker also keeps in memory (copies of its
            # files: a hit on one is a dict lookup, not a file read). None: max-size / 16,
            # at most 256 MiB; 0: none.
            "memory-size": None,
            # The largest object kept in memory.
            "memory-object-limit": "64KiB",
        }
    }
)

#: ``memory_size`` when not given: this share of ``max_size``, at most ``MEMORY_SIZE_CAP``.
MEMORY_SIZE_SHARE, MEMORY_SIZE_CAP = 16, 256 * 2**20


def _parse_size(value: int | str, name: str, zero: bool = False) -> int:
    """A number of bytes, or a size string like ``"2GiB"``: positive (or 0 with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CacheConfigError(
            f"{name} must be an int number of bytes or a size string like '2GiB', got {value!r}"
        )
    if isinstance(value, str):
        if not value.strip():
            raise CacheConfigError(f"{name} is an empty string; give a size like '2GiB'")
        try:
            value = parse_bytes(value)
        except (ValueError, TypeError) as err:
            raise CacheConfigError(f"{name} {value!r} is not a size like '2GiB'") from err
    if value < 0 or (value == 0 and not zero):
        raise CacheConfigError(f"{name} must be positive, got {value!r} bytes")
    return int(value)


def _parse_seconds(value: float | int | str | None, name: str) -> float | None:
    """A positive, finite number of seconds (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as err:
            raise CacheConfigError(f"{name} {value!r} is not a number") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CacheConfigError(f"{name} must be a number or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise CacheConfigError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _parse_file_mode(value: object) -> int:
    """Parse a file mode: ``0o600``, ``384``, ``"0600"``, ``"600"`` or ``"0o600"``.

    The owner must be able to read and write; nobody gets more than read and write.
    """
    mode = value
    if isinstance(value, str):
        try:
            mode = int(value.removeprefix("0o"), 8)
        except ValueError:
            mode = None
    if (
        isinstance(mode, bool)
        or not isinstance(mode, int)
        or mode & ~0o666
        or mode & 0o600 != 0o600
    ):
        raise CacheConfigError(
            f"zarr-cache.file-mode must be an octal mode like '0600' that lets the owner read "
            f"and write and grants nothing beyond read and write, got {value!r}"
        )
    return mode


def _parse_flag(name: str) -> bool:
    """A yes/no setting: a bool, or ``true``/``false``/``1``/``0`` from the environment."""
    value = dask.config.get(f"zarr-cache.{name}")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise CacheConfigError(f"zarr-cache.{name} must be true or false, got {value!r}")


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
    write_lease : float
        Seconds a worker may serve its files after its last catch-up with the write history.
    policy : {"tinylfu", "lru"}
        Replacement policy of the index (dask config ``zarr-cache.policy``).
    locality : bool
        Whether chunk reads are steered to their chunk's worker (``zarr-cache.locality``).
    index_shards : int
        Shards the index is split over (``zarr-cache.index-shards``).
    read_timeout : float
        Seconds a read waits for the index and peers in all before it reads the source
        (``zarr-cache.read-timeout``).
    file_mode : int
        Mode of cache files (``zarr-cache.file-mode``).
    trusted_parent : bool
        Accept a parent directory other users may write to (``zarr-cache.trusted-parent``).
    revalidate_after : float or None
        Seconds after which a cached object is checked against its source, in bulk (dask
        config ``zarr-cache.revalidate-after``); ``None``: never.
    cache_writes : bool
        Whether an object a task writes through the cache is kept on its worker (dask
        config ``zarr-cache.cache-writes``).
    memory_size : int
        Bytes of small objects' copies each worker keeps in memory beside their files
        (``zarr-cache.memory-size``; 0: none).
    memory_object_limit : int
        The largest object kept in memory (``zarr-cache.memory-object-limit``).

    Notes
    -----
    The remaining fields are the cache's internal timings, in seconds, in one place; they
    are not dask config (tests and benchmarks set them):

    - ``disk_retry``: writing to the cache disk stays paused this long after a write failed.
    - ``peer_backoff``: a peer that failed is in back-off this long (its first answer ends
      it): hints do not name it, a read sent to it within ``read_timeout`` of its failure
      skips it, and a later one asks it for ``peer_probe_timeout`` at most.
    - ``peer_probe_timeout``: how long a read waits for a peer in back-off.  A healthy one
      answers in time (and its answer ends the back-off); a frozen one costs each read
      this much, not the whole ``read_timeout``.
    - ``known_check_interval``: between flushes that ask every index shard whether it
      knows this worker (one that forgot it then gets its files again).
    - ``report_wait``: a flush waits this long for its report to the index (it goes on).
    - ``pending_timeout``: a fetch claimed this long ago may be taken over by another
      worker.
    - ``index_wait``: registering the plugin waits this long for the first index shard.
    - ``clock_margin``: a file of an earlier cluster is kept only if its source object was
      last modified this long before the file's bytes were read (clocks, slow uploads).
    - ``revalidate_grace``: an object due for its check against the source
      (``revalidate_after``) is still served this long while the check runs, then not.
    - ``loop_wait``: a hop to the worker's event loop that has not started this long
      after it was sent finds the loop blocked (see :mod:`~dask_zarr_cache.core.loops`);
      the read goes to the source.
    - ``prove_wait``: the first read of a dataset on a worker waits this long for the
      check of earlier clusters' files (the check goes on after; reads meanwhile go to the
      index and, for files not yet checked, to the source).  Only workers that found
      files at start are asked: on empty disks the wait is one scheduler round trip.
    - ``prove_timeout``: the scheduler waits this long for the workers' checks of a
      dataset's files of an earlier cluster (readers wait at most ``read_timeout``).
    - ``coverage_interval``: the dashboard's datasets table lists each dataset's objects
      (a listing of its source, by a worker) at most this often, and only while viewed.

    Derived from ``write_lease`` (properties): :attr:`write_push_timeout`,
    :attr:`write_index_timeout` and :attr:`write_wait`.

    """

    max_size: int
    max_age_seconds: float | None = None
    directory: str | None = None
    write_lease: float = 10.0
    policy: str = "tinylfu"
    locality: bool = True
    index_shards: int = 1
    read_timeout: float = 5.0
    file_mode: int = 0o600
    trusted_parent: bool = False
    revalidate_after: float | None = None
    cache_writes: bool = True
    memory_size: int = 0
    memory_object_limit: int = 64 * 2**10
    disk_retry: float = 5.0
    peer_backoff: float = 30.0
    peer_probe_timeout: float = 0.5
    known_check_interval: float = 10.0
    report_wait: float = 1.0
    pending_timeout: float = 60.0
    index_wait: float = 30.0
    clock_margin: float = 60.0
    prove_timeout: float = 60.0
    prove_wait: float = 10.0
    loop_wait: float = HOP_START_WAIT
    revalidate_grace: float = 5.0
    coverage_interval: float = 10.0

    @property
    def write_push_timeout(self) -> float:
        """Seconds a write waits for each worker to apply it (at most 10 s)."""
        return min(self.write_lease, 10.0)

    @property
    def write_index_timeout(self) -> float:
        """Seconds a write waits for the index to drop its keys.

        The index may live on the very worker whose event loop waits for the write, and
        correctness does not rest on it (workers drop their files and fetches themselves).
        """
        return self.write_push_timeout / 4

    @property
    def write_wait(self) -> float:
        """Seconds after its start at which a write stops waiting for unconfirmed workers.

        The lease of a worker that did not confirm it (from a catch-up sent before the
        write) has run out by then, with 10 % and 0.5 s to spare for clocks and transit.
        """
        return self.write_lease * 1.1 + 0.5

    @classmethod
    def from_arguments(
        cls,
        max_size: int | str | None = None,
        max_age_seconds: float | int | str | None = None,
        directory: str | os.PathLike[str] | None = None,
        revalidate_after: float | int | str | None = None,
        cache_writes: bool | None = None,
        memory_size: int | str | None = None,
        memory_object_limit: int | str | None = None,
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
        if revalidate_after is None:
            revalidate_after = dask.config.get("zarr-cache.revalidate-after")
        lease = parse_timedelta(dask.config.get("zarr-cache.write-lease"))
        if not lease or lease <= 0:
            raise CacheConfigError(f"zarr-cache.write-lease must be positive, got {lease!r}")
        policy = dask.config.get("zarr-cache.policy")
        if policy not in POLICIES:
            raise CacheConfigError(f"zarr-cache.policy must be one of {POLICIES}, got {policy!r}")
        shards = dask.config.get("zarr-cache.index-shards")
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise CacheConfigError(
                f"zarr-cache.index-shards must be a positive integer, got {shards!r}"
            )
        read_timeout = parse_timedelta(dask.config.get("zarr-cache.read-timeout"))
        if not read_timeout or read_timeout <= 0:
            raise CacheConfigError(
                f"zarr-cache.read-timeout must be positive, got {read_timeout!r}"
            )
        file_mode = _parse_file_mode(dask.config.get("zarr-cache.file-mode"))
        if cache_writes is None:
            cache_writes = _parse_flag("cache-writes")
        elif not isinstance(cache_writes, bool):
            raise CacheConfigError(f"cache_writes must be True or False, got {cache_writes!r}")
        max_size = _parse_size(max_size, "max_size")
        if memory_size is None:
            memory_size = dask.config.get("zarr-cache.memory-size")
        if memory_size is None:
            memory_size = min(max_size // MEMORY_SIZE_SHARE, MEMORY_SIZE_CAP)
        if memory_object_limit is None:
            memory_object_limit = dask.config.get("zarr-cache.memory-object-limit")
        return cls(
            max_size=max_size,
            max_age_seconds=_parse_seconds(max_age_seconds, "max_age_seconds"),
            revalidate_after=_parse_seconds(revalidate_after, "revalidate_after"),
            directory=_parse_directory(directory),
            write_lease=float(lease),
            policy=policy,
            locality=bool(dask.config.get("zarr-cache.locality")),
            index_shards=shards,
            read_timeout=float(read_timeout),
            file_mode=file_mode,
            trusted_parent=_parse_flag("trusted-parent"),
            cache_writes=cache_writes,
            memory_size=_parse_size(memory_size, "memory_size", zero=True),
            memory_object_limit=_parse_size(memory_object_limit, "memory_object_limit"),
        )


def worker_directory(settings: CacheSettings, worker_name: object, local_directory: str) -> str:
    """The cache directory of one worker.

    Without ``settings.directory``: ``<local_directory>/zarr-cache``.  With it, a
    subdirectory per worker name: readable part + a hash of the exact name, so no name
    (``..``, ``a b`` vs ``a_b``, very long ones) leaves ``directory`` or shares another
    worker's subdirectory, and a restarted worker with the same name finds its files.
    """
    if settings.directory is None:
        return os.path.join(local_directory, "zarr-cache")
    name = str(worker_name)
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "worker"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return os.path.join(settings.directory, f"{readable}-{digest}")
