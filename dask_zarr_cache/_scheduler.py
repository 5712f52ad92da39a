"""Scheduler side: settings, the index actor's lifecycle, and cluster-wide calls.

The index is a Dask Actor created by an internal client of the scheduler on one worker.
When that worker leaves, a new (empty) actor is created on another worker and workers
re-register the files on their disks as they next call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

from distributed.protocol.pickle import dumps
from distributed.protocol.serialize import Serialized, deserialize

from dask_zarr_cache._exceptions import ZarrCacheError
from dask_zarr_cache._index import IndexActor
from dask_zarr_cache._index_client import IndexClient, IndexUnavailableError
from dask_zarr_cache._stats import total_of
from dask_zarr_cache.dashboard import (
    CacheHistory,
    add_http_routes,
    register_prometheus_collector,
)

if TYPE_CHECKING:
    from distributed import Client, Scheduler

    from dask_zarr_cache._config import CacheSettings

__all__ = ["EXTENSION_NAME", "WORKER_PLUGIN_NAME", "ZarrCacheScheduler", "run_on_scheduler"]

logger = logging.getLogger(__name__)

#: Key of the :class:`ZarrCacheScheduler` in ``scheduler.extensions``.
EXTENSION_NAME = "zarr_cache"
#: Name of the worker plugin installed on every worker.
WORKER_PLUGIN_NAME = "dask-zarr-cache-worker"


class ZarrCacheScheduler:
    """Scheduler-side state of the cluster cache (one per scheduler).

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler.
    settings : CacheSettings
        Initial settings; :meth:`apply` replaces them.

    """

    def __init__(self, scheduler: Scheduler, settings: CacheSettings) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.location: dict[str, str] | None = None
        self.index = IndexClient(None, scheduler.rpc, locate=self.locate_index)
        self._index_future: Any = None
        self._client: Client | None = None
        self._creating: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        scheduler.handlers["zarr_cache_index"] = self.locate_index
        self.history = CacheHistory(scheduler)
        self.history.start()
        add_http_routes(scheduler)
        register_prometheus_collector()

    async def apply(self, settings: CacheSettings) -> None:
        """Install (or re-install) the worker plugin with ``settings`` on every worker."""
        from dask_zarr_cache._plugin import WorkerCachePlugin

        self.settings = settings
        await self.scheduler.register_worker_plugin(
            comm=None,
            plugin=dumps(WorkerCachePlugin(settings)),
            name=WORKER_PLUGIN_NAME,
            idempotent=False,
        )
        if self.location is not None:
            with contextlib.suppress(IndexUnavailableError):
                await self.index.call("configure", settings.max_age_seconds)

    # -- the index actor -----------------------------------------------------------------
    async def locate_index(self) -> dict[str, str] | None:
        """Address and key of the index actor, or ``None`` while there is none.

        Never waits for the index to be created: creating the actor needs a free worker
        thread, and the callers are often the very reads occupying those threads.  They
        read from the source meanwhile and ask again later.
        """
        self.ensure_index()
        return self.location

    def ensure_index(self) -> asyncio.Future[None]:
        """Start creating the index actor unless it exists or is being created."""
        if self.location is None and (self._creating is None or self._creating.done()):
            self._creating = asyncio.ensure_future(self._create_index())
        return self._creating if self._creating is not None else _done()

    async def _create_index(self) -> None:
        try:
            await self._create_index_on_a_worker()
        except Exception as err:  # retried on the next worker arrival or lookup
            if self.scheduler.status.name not in ("closing", "closed"):
                logger.warning("could not create the zarr cache index: %r", err)

    async def _create_index_on_a_worker(self) -> None:
        from distributed import Client

        host = self._choose_host()
        if host is None:
            return
        if self._client is None:
            self._client = await Client(
                self.scheduler.address,
                asynchronous=True,
                set_as_default=False,
                security=self.scheduler.security,
                name="dask-zarr-cache-index",
            )
        key = f"zarr-cache-index-{uuid.uuid4().hex[:12]}"
        future = self._client.submit(
            IndexActor,
            self.settings.max_age_seconds,
            actor=True,
            workers=[host],
            allow_other_workers=False,
            pure=False,
            key=key,
        )
        actor = await future
        self._index_future = future
        self.location = {"address": actor._address, "key": key}
        logger.info("zarr cache index created on %s", actor._address)
        # Workers re-register the files on their disks now, not at their next miss: until
        # then the new index would send other workers to the source for those keys.
        await self.broadcast("handle_index_moved")

    def _choose_host(self) -> str | None:
        workers = [
            ws.address
            for ws in self.scheduler.workers.values()
            if ws.status.name in ("running", "paused")
        ]
        return min(workers) if workers else None

    def worker_closing(self, worker: str) -> None:
        """Move the index off a worker that is being retired.

        ``retire_workers`` refuses to retire a worker holding an actor. Called from the
        (synchronous) ``worker-status-change`` event, before that check runs, this
        releases the actor's task and starts a new index on another worker.
        """
        if self.location is None or worker != self.location["address"]:
            return
        logger.info("zarr cache index host %s is retiring; moving the index", worker)
        key, client = self.location["key"], self._client
        if client is not None and client.id in self.scheduler.clients:
            self.scheduler.client_releases_keys(
                keys=[key], client=client.id, stimulus_id=f"zarr-cache-move-index-{key}"
            )
        self._recreate_index()

    def _recreate_index(self) -> None:
        """Forget the current index actor and start a new one on another worker."""
        self.location = None
        self.index.reset()
        self._index_future = None
        self.ensure_index()

    def remove_worker(self, worker: str) -> None:
        """Drop a departed worker's entries, or re-create the index if it hosted it."""
        if self.location is None:
            return
        if worker == self.location["address"]:
            logger.info("zarr cache index host %s left; re-creating the index", worker)
            self._recreate_index()
        else:
            self._spawn(self._call_index("remove_worker", worker))

    async def _call_index(self, function: str, *args: Any) -> Any:
        try:
            return await self.index.call(function, *args)
        except IndexUnavailableError as err:
            logger.debug("zarr cache index call %s failed: %s", function, err)
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop background work and close the internal client."""
        self.history.stop()
        for task in [*self._background, self._creating]:
            if task is not None:
                task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- cluster-wide operations ---------------------------------------------------------
    async def broadcast(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """Call ``WorkerCache.<method>(**kwargs)`` on every worker; results by address.

        Goes through the workers' built-in ``run`` handler, so workers without a cache
        (still setting up, or without the plugin) answer ``None`` instead of logging a
        missing-handler error. Unreachable workers are left out.
        """
        replies = await self.scheduler.broadcast(
            msg={
                "op": "run",
                "function": dumps(_call_worker_cache),
                "args": dumps((method,)),
                "kwargs": dumps(kwargs),
                "wait": True,
            },
            on_error="ignore",
        )
        return {
            addr: _deserialized(reply.get("result"))
            for addr, reply in replies.items()
            if isinstance(reply, dict) and reply.get("status") == "OK"
        }

    async def invalidate(self, keys: str, prefixes: str) -> int:
        """Drop cache keys and key prefixes on every worker, then from the index."""
        replies = await self.broadcast("handle_invalidate", keys=keys, prefixes=prefixes)
        await self._call_index("invalidate", keys, prefixes)
        return sum(r for r in replies.values() if isinstance(r, int))

    async def stats(self) -> dict[str, Any]:
        """Counters of every worker, their totals, and the index's own summary."""
        replies = await self.broadcast("handle_stats")
        workers = {addr: r for addr, r in replies.items() if isinstance(r, dict)}
        index = await self._call_index("summary")
        return {"total": total_of(workers), "workers": workers, "index": index}


def _deserialized(value: Any) -> Any:
    # The scheduler relays a worker's ``run`` result still serialized.
    if isinstance(value, Serialized):
        return deserialize(value.header, value.frames)
    return value


async def _call_worker_cache(method: str, dask_worker: Any = None, **kwargs: Any) -> Any:
    from dask_zarr_cache._worker import worker_cache_of

    cache = worker_cache_of(dask_worker)
    return None if cache is None else await getattr(cache, method)(**kwargs)


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _extension(dask_scheduler: Scheduler) -> ZarrCacheScheduler:
    state = dask_scheduler.extensions.get(EXTENSION_NAME)
    if state is None:
        raise ZarrCacheError(
            "ZarrCachePlugin is not registered on this cluster; call "
            "client.register_plugin(ZarrCachePlugin(...)) first"
        )
    return state


async def _invalidate(dask_scheduler: Scheduler, keys: str, prefixes: str) -> int:
    if EXTENSION_NAME not in dask_scheduler.extensions:
        return 0  # no cluster cache: nothing to invalidate
    return await _extension(dask_scheduler).invalidate(keys, prefixes)


async def _stats(dask_scheduler: Scheduler) -> dict[str, Any]:
    return await _extension(dask_scheduler).stats()


async def run_on_scheduler(scheduler_rpc: Any, function: str, **kwargs: Any) -> Any:
    """Run a scheduler-side operation (``"invalidate"`` or ``"stats"``) and return its result.

    Goes through the always-present ``run_function`` handler, so it answers (with a clear
    error or a no-op) even when the plugin is not registered, where a call to a missing
    handler would hang.
    """
    func = {"invalidate": _invalidate, "stats": _stats}[function]
    response = await scheduler_rpc.run_function(
        function=dumps(func), args=dumps(()), kwargs=dumps(kwargs), wait=True
    )
    if response["status"] == "error":
        from distributed.core import clean_exception

        _, exc, tb = clean_exception(**response)
        raise exc.with_traceback(tb)
    return response["result"]
