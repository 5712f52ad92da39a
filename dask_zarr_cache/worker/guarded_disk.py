"""A worker's cache directory behind a policy: trouble with one object costs that object.

:class:`GuardedDisk` claims the directory lazily and classifies failed writes: an error
about one object (a name or size the filesystem refuses) skips that object; an error that
says the disk itself is unusable (full, read-only, gone) pauses writing for
``retry`` seconds, after which the next write tries again and, if it succeeds,
resumes caching.  A directory that is not the cache's (or another worker's) is never used.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from dask_zarr_cache.core.clock import Clock, wall_clock
from dask_zarr_cache.core.exceptions import CacheDirectoryError
from dask_zarr_cache.worker.disk import DiskCache, is_disk_failure

if TYPE_CHECKING:
    from dask_zarr_cache.core.protocol import Payload
    from dask_zarr_cache.worker.state import LocalState

__all__ = ["GuardedDisk"]

logger = logging.getLogger(__name__)


class GuardedDisk:
    """Writes cache files unless the disk is in trouble; methods block (call in a thread).

    Parameters
    ----------
    disk : DiskCache
        The directory.
    state : LocalState
        Where ``disk_errors`` and ``caching_disabled`` are counted (under its lock).
    clock : callable
        Seconds; tests inject their own.
    retry : float
        Seconds writing stays paused after the disk failed a write.

    """

    def __init__(
        self,
        disk: DiskCache,
        state: LocalState,
        clock: Clock = wall_clock,
        retry: float = 5.0,
    ) -> None:
        self.disk = disk
        self.state = state
        self.clock = clock
        self.retry = retry
        self._open = False  # until the directory is claimed (start, or a later write)
        self._refused = False  # the directory is not ours: never write there
        self._paused_until: float | None = None
        self._lock = threading.Lock()

    def usable(self) -> bool:
        """Whether a write may be tried now: the directory is ours and not paused."""
        with self._lock:
            if self._refused:
                return False
            if self._paused_until is not None and self.clock() < self._paused_until:
                return False
            if not self._open:
                try:
                    self.disk.open()
                except CacheDirectoryError as err:
                    self._trouble(err, permanent=True)
                    return False
                except OSError as err:
                    self._trouble(err)
                    return False
                self._open = True
            return True

    def write(
        self, key: str, data: Payload, epoch: bytes, seq: int, fetched_at: float
    ) -> int | None:
        """Write a cache file and return its checksum; ``None`` if it was not written.

        ``fetched_at``: when the source read began (wall clock).
        """
        if not self.usable():
            return None
        try:
            crc = self.disk.write(key, data, epoch, seq, fetched_at)
        except OSError as err:
            self.state.count(disk_errors=1)
            if is_disk_failure(err):
                self._trouble(err)
            else:  # this object only
                logger.debug("could not cache %r: %s", key, err)
            return None
        if self._paused_until is not None:
            self._paused_until = None
            self.state.gauge(caching_disabled=0)
            logger.warning("zarr cache directory %s takes writes again", self.disk.root)
        return crc

    def _trouble(self, err: Exception, permanent: bool = False) -> None:
        first = self.state.counts()["caching_disabled"] == 0
        self.state.gauge(caching_disabled=1)
        if permanent:
            self._refused = True
        else:
            self._paused_until = self.clock() + self.retry
        if first:
            logger.warning(
                "zarr cache cannot write %s (%s); reading through to the source%s",
                self.disk.root,
                err,
                "" if permanent else f", trying again every {self.retry:g} s",
            )
