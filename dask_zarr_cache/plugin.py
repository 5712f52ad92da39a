"""``ZarrCachePlugin``: one registration installs the whole cluster cache."""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.protocol.pickle import loads
from tornado.ioloop import PeriodicCallback

from dask_zarr_cache.core.config import CacheSettings, worker_directory
from dask_zarr_cache.core.loops import event_loop_of
from dask_zarr_cache.core.names import (
    EXTENSION_NAME,
    METRIC_PREFIX,
    SCHEDULER_PLUGIN_NAME,
    WORKER_PLUGIN_NAME,
)
from dask_zarr_cache.core.protocol import DatasetObjects, pack
from dask_zarr_cache.datasets import named_objects
from dask_zarr_cache.index.host import INDEX_HOST_NAME, IndexHost
from dask_zarr_cache.observe.prometheus import bind_prometheus
from dask_zarr_cache.scheduler.locality import steer_reads
from dask_zarr_cache.scheduler.state import ZarrCacheScheduler, scheduler_state
from dask_zarr_cache.worker.cache import WorkerCache

if TYPE_CHECKING:
    import os

    from distributed import Scheduler, Worker

__all__ = ["WorkerCachePlugin", "ZarrCachePlugin"]


class ZarrCachePlugin(SchedulerPlugin):
    """Install the cluster-wide Zarr chunk cache with ``client.register_plugin``.

    Registering it sets up the scheduler side (write history, the index actor's lifecycle)
    and installs a :class:`WorkerCachePlugin` on every current and future worker.
    Registering again with other settings applies them.

    Parameters
    ----------
    max_size : int or str, optional
        Bytes each worker may keep on its local disk, e.g. ``"50GiB"``; default from dask
        config ``zarr-cache.max-size`` (10 GiB).
    max_age_seconds : float, optional
        Time to live of cached objects; ``None`` (default) means they never expire.
    revalidate_after : float, optional
        Seconds after which a cached object is checked against its source (one listing
        per directory and worker) and kept if unchanged, instead of expiring: changes made
        behind the cache's back show up within about this long, and the rest stays
        cached.  ``None`` (default): never checked.
    cache_writes : bool, optional
        Whether an object a task writes through ``ClusterCacheStore`` is kept on that
        task's worker (at the write's place in the write history), so reading it back
        makes no GET; default from dask config ``zarr-cache.cache-writes`` (``True``).
        Under the ``tinylfu`` policy a written object enters a full cache only in place
        of one read less often, so a large write does not push out what is being read.
    directory : str, optional
        Parent directory of the worker caches (each worker uses a subdirectory derived from
        its name); default ``<worker.local_directory>/zarr-cache``.
    memory_size : int or str, optional
        Bytes of small objects each worker also keeps in memory, beside their files, so a
        hit on one is a dict lookup; default from dask config ``zarr-cache.memory-size``
        (``None``: ``max_size / 16``, at most 256 MiB); ``0``: none.
    memory_object_limit : int or str, optional
        The largest object kept in memory; default ``zarr-cache.memory-object-limit``
        (64 KiB).

    Raises
    ------
    CacheConfigError
        If an argument is invalid.

    """

    name = SCHEDULER_PLUGIN_NAME

    def __init__(
        self,
        max_size: int | str | None = None,
        max_age_seconds: float | None = None,
        directory: str | os.PathLike[str] | None = None,
        revalidate_after: float | None = None,
        cache_writes: bool | None = None,
        memory_size: int | str | None = None,
        memory_object_limit: int | str | None = None,
    ) -> None:
        self.settings = CacheSettings.from_arguments(
            max_size,
            max_age_seconds,
            directory,
            revalidate_after,
            cache_writes,
            memory_size,
            memory_object_limit,
        )
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
        state = scheduler_state(scheduler)
        if state is None:
            state = scheduler.extensions[EXTENSION_NAME] = ZarrCacheScheduler(
                scheduler, self.settings
            )
        self._scheduler_state = state
        if not state.installed or state.settings != self.settings:  # a new plugin or settings
            await state.apply(self.settings, WorkerCachePlugin(self.settings))
        if scheduler.workers:  # have the index ready before the first read, if we can
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(state.shards.ensure()), self.settings.index_wait
                )

    def update_graph(self, scheduler: Scheduler, *, tasks: list[Any], **kwargs: Any) -> None:
        """Steer new chunk reads to the workers that hold (or will hold) their chunks."""
        state = scheduler_state(scheduler)
        if state is not None and state.settings.locality:
            steer_reads(scheduler, tasks)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        """Create the index as soon as there is a worker to host it."""
        state = scheduler_state(scheduler)
        if state is not None:
            state.shards.ensure()

    def log_event(self, topic: str, msg: Any) -> None:
        """Move the index off a worker as soon as it starts retiring."""
        if (
            isinstance(msg, dict)
            and msg.get("action") == "worker-status-change"
            and msg.get("status") == "closing_gracefully"
            and self._scheduler_state is not None
        ):
            self._scheduler_state.shards.retiring(topic)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        """Forget the departed worker's entries (re-create the index if it hosted it)."""
        state = scheduler_state(scheduler)
        if state is not None:
            state.remove_worker(worker)

    async def close(self) -> None:
        """Close the scheduler-side state (its internal client) with the scheduler."""
        state = self._scheduler_state
        if state is not None:
            await state.close()


class WorkerCachePlugin(WorkerPlugin):
    """Worker half of the cache, installed by :class:`ZarrCachePlugin` on every worker.

    Installs the :class:`~dask_zarr_cache.worker.cache.WorkerCache` as ``worker.extensions
    ["zarr_cache"]``, its handlers, its Workers-table metrics and its periodic flush.
    Registered again, distributed tears the old one down first: the old cache lets its
    loads in flight finish and releases the directory, and the new one scans it, so
    every file stays tracked.

    Parameters
    ----------
    settings : CacheSettings
        Budget, TTL, lease and directory.

    """

    name = WORKER_PLUGIN_NAME

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    async def setup(self, worker: Worker) -> None:
        """Start this worker's cache (after the previous one, if any, is closed)."""
        async with _setup_lock(worker):  # registrations may overlap; caches must not
            await _uninstall(worker)
            await self._setup(worker)

    async def _setup(self, worker: Worker) -> None:
        directory = worker_directory(self.settings, worker.name, worker.local_directory)
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
        cache = WorkerCache(
            worker.address,
            worker.scheduler,
            worker.rpc,
            event_loop_of(worker),
            self.settings,
            directory,
            timeout=timeout,
        )
        # Handlers first: the scheduler counts this worker in from its first catch-up (in
        # start) and may call them from then on.
        host = worker.extensions.setdefault(INDEX_HOST_NAME, IndexHost())
        worker.handlers.update(host.handlers)
        worker.extensions[EXTENSION_NAME] = cache
        worker.handlers.update(cache.handlers)
        worker.handlers["zarr_cache_dataset_objects"] = self.zarr_cache_dataset_objects
        await cache.start()
        for name in cache.counters.as_dict():  # columns of the dashboard's Workers table
            worker.metrics[METRIC_PREFIX + name] = _counter_reader(cache, name)
        bind_prometheus(worker)
        interval = parse_timedelta(dask.config.get("zarr-cache.flush-interval"))
        flusher = PeriodicCallback(cache.flush, interval * 1000)
        worker.periodic_callbacks["zarr-cache-flush"] = flusher
        flusher.start()

    async def zarr_cache_dataset_objects(self, dataset: bytes) -> bytes:
        """A dataset's name and stored objects (packed ``DatasetObjects``), for the scheduler.

        ``dataset`` is a pickled :class:`~dask_zarr_cache.store.ClusterCacheStore`; its
        metadata and one listing of its source are read here, off the event loop.
        """
        store = loads(dataset)
        objects = await asyncio.to_thread(named_objects, store)
        return pack(DatasetObjects(str(store), objects))

    async def teardown(self, worker: Worker) -> None:
        """Stop the cache; its files stay for the next setup on this directory."""
        async with _setup_lock(worker):
            await _uninstall(worker)


_setup_locks: weakref.WeakKeyDictionary[Worker, asyncio.Lock] = weakref.WeakKeyDictionary()


def _setup_lock(worker: Worker) -> asyncio.Lock:
    """One lock per worker: a cache is fully set up or torn down before the next starts."""
    lock = _setup_locks.get(worker)
    if lock is None:
        lock = _setup_locks[worker] = asyncio.Lock()
    return lock


async def _uninstall(worker: Worker) -> None:
    flusher = worker.periodic_callbacks.pop("zarr-cache-flush", None)
    if flusher is not None:
        flusher.stop()
    cache = worker.extensions.pop(EXTENSION_NAME, None)
    for name in list(worker.metrics):
        if name.startswith(METRIC_PREFIX):
            del worker.metrics[name]
    if isinstance(cache, WorkerCache):
        # Only a running worker gets a new cache on this directory (plugin registered
        # again); a closing one must not wait for loads (say, from a peer that is gone).
        await cache.close(finish_loads=worker.status.name in ("running", "paused"))


def _counter_reader(cache: WorkerCache, name: str) -> Any:
    def read(worker: Worker) -> int:
        return getattr(cache.counters, name)

    return read
