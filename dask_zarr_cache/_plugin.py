"""``ZarrCachePlugin``: one registration installs the whole cluster cache."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from dask_zarr_cache._config import CacheSettings
from dask_zarr_cache._scheduler import EXTENSION_NAME, ZarrCacheScheduler
from dask_zarr_cache._worker import EXTENSION_NAME as WORKER_EXTENSION_NAME
from dask_zarr_cache._worker import WorkerCache

if TYPE_CHECKING:
    import os

    from distributed import Scheduler, Worker

__all__ = ["WorkerCachePlugin", "ZarrCachePlugin"]

#: Seconds registration waits for the index actor before returning anyway.
_INDEX_WAIT = 30


class ZarrCachePlugin(SchedulerPlugin):
    """Install the cluster-wide Zarr chunk cache with ``client.register_plugin``.

    Registering it sets up the scheduler side (the index actor's lifecycle) and installs
    a :class:`WorkerCachePlugin` on every current and future worker.  Registering again
    with other settings applies them.

    Parameters
    ----------
    max_size : int or str, optional
        Bytes each worker may keep on its local disk, e.g. ``"50GiB"``; default from dask
        config ``zarr-cache.max-size`` (10 GiB).
    max_age_seconds : float, optional
        Time to live of cached objects; ``None`` (default) means they never expire.
    directory : str, optional
        Parent directory of the worker caches (each worker uses a subdirectory named after
        it); default ``<worker.local_directory>/zarr-cache``.

    Raises
    ------
    CacheConfigError
        If an argument is invalid.

    """

    name = "dask-zarr-cache"

    def __init__(
        self,
        max_size: int | str | None = None,
        max_age_seconds: float | None = None,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = CacheSettings.from_arguments(max_size, max_age_seconds, directory)
        self._scheduler_state: ZarrCacheScheduler | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}  # the scheduler state never travels

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = state["settings"]
        self._scheduler_state = None

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"ZarrCachePlugin(max_size={s.max_size}, max_age_seconds={s.max_age_seconds}, "
            f"directory={s.directory!r})"
        )

    async def start(self, scheduler: Scheduler) -> None:
        """Create (or update) the scheduler-side state and install the worker plugin."""
        state = scheduler.extensions.get(EXTENSION_NAME)
        if state is None:
            state = scheduler.extensions[EXTENSION_NAME] = ZarrCacheScheduler(
                scheduler, self.settings
            )
        self._scheduler_state = state
        await state.apply(self.settings)
        if scheduler.workers:  # have the index ready before the first read, if we can
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(state.ensure_index()), _INDEX_WAIT)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        """Create the index as soon as there is a worker to host it."""
        state = scheduler.extensions.get(EXTENSION_NAME)
        if state is not None:
            state.ensure_index()

    def log_event(self, topic: str, msg: Any) -> None:
        """Move the index off a worker as soon as it starts retiring."""
        if (
            isinstance(msg, dict)
            and msg.get("action") == "worker-status-change"
            and msg.get("status") == "closing_gracefully"
            and self._scheduler_state is not None
        ):
            self._scheduler_state.worker_closing(topic)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        """Forget the departed worker's entries (re-create the index if it hosted it)."""
        state = scheduler.extensions.get(EXTENSION_NAME)
        if state is not None:
            state.remove_worker(worker)

    async def close(self) -> None:
        """Close the scheduler-side state (its internal client) with the scheduler."""
        state = self._scheduler_state
        if state is not None:
            await state.close()


class WorkerCachePlugin(WorkerPlugin):
    """Worker half of the cache, installed by :class:`ZarrCachePlugin` on every worker.

    Parameters
    ----------
    settings : CacheSettings
        Budget, TTL and directory.

    """

    name = "dask-zarr-cache-worker"

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    async def setup(self, worker: Worker) -> None:
        """Start this worker's :class:`WorkerCache` (adopting files already on disk)."""
        old = worker.extensions.pop(WORKER_EXTENSION_NAME, None)
        if isinstance(old, WorkerCache):
            await old.close()
        cache = WorkerCache(worker, self.settings)
        await cache.start()
        worker.extensions[WORKER_EXTENSION_NAME] = cache

    async def teardown(self, worker: Worker) -> None:
        """Stop the cache; its files stay for the next setup on this directory."""
        cache = worker.extensions.pop(WORKER_EXTENSION_NAME, None)
        if isinstance(cache, WorkerCache):
            await cache.close()
