"""Scheduler side: settings, the write history, the index actor's lifecycle, handlers.

Handlers (``scheduler.handlers``), each a named operation with a typed reply:

- ``zarr_cache_index()`` -> per index shard, ``{"address", "key"}`` of its host or ``None``.
- ``zarr_cache_sync(worker, epoch, seq, found_files)`` -> packed
  :class:`~dask_zarr_cache.core.protocol.SyncReply`: the writes a worker has not applied
  yet; renews its lease.  ``found_files``: the worker found files on its disk at start
  that no check has seen yet.
- ``zarr_cache_write(keys, prefixes, origin)`` -> packed
  :class:`~dask_zarr_cache.core.protocol.WriteReply`: record a write, drop it from the
  index and every worker, return once no worker can serve the old bytes
  (:class:`~dask_zarr_cache.writes.coordinator.WriteCoordinator`: group-committed).
- ``zarr_cache_evict(keys, prefixes)`` -> ``{"seq", "unreached", "objects", "bytes", "workers"}``:
  a write that changed nothing at the source; returns what the workers dropped.
- ``zarr_cache_prove(prefix, store, dataset)`` -> ``{"current", "stale"}``: every worker
  that found files at start checks those below a dataset's key prefix against the source
  (once); the dataset joins the dashboard's datasets table.
- ``zarr_cache_cluster_stats()`` -> ``{"total", "workers", "index"}``.
- ``zarr_cache_cached(keys)`` (JSON list) -> ``"0"``/``"1"`` per key: cached somewhere?

The index is split into shards (``zarr-cache.index-shards``), each hosted by a worker (the
one hosting the fewest shards).  When a shard's worker leaves, a new (empty) shard is
created on another worker and workers re-register their files of that shard; the other
shards carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from distributed.protocol.pickle import dumps

from dask_zarr_cache.core.exceptions import IndexUnavailableError, ZarrCacheError
from dask_zarr_cache.core.names import EXTENSION_NAME, WORKER_PLUGIN_NAME
from dask_zarr_cache.core.protocol import (
    DatasetObjects,
    ProveReply,
    pack,
    unpack,
)
from dask_zarr_cache.index.placement import IndexShards
from dask_zarr_cache.observe.coverage import DatasetCoverage
from dask_zarr_cache.observe.dashboard import add_http_routes
from dask_zarr_cache.observe.history import CacheHistory
from dask_zarr_cache.observe.prometheus import bind_prometheus
from dask_zarr_cache.worker.counters import total_of
from dask_zarr_cache.writes.coordinator import WriteCoordinator

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from distributed import Scheduler
    from distributed.diagnostics.plugin import WorkerPlugin

    from dask_zarr_cache.core.config import CacheSettings

__all__ = ["ZarrCacheScheduler"]

logger = logging.getLogger(__name__)


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
        self.installed = False  # the worker plugin was registered with ``settings``
        self.shards = IndexShards(scheduler, settings, self._cache_workers, self._index_created)
        self.index = self.shards.client
        self.writes = WriteCoordinator(
            settings, self._ask, lambda: self.scheduler.workers, self.index.invalidate
        )
        self._background: set[asyncio.Task[Any]] = set()
        #: Checks of files of an earlier cluster, by dataset key prefix: once per cluster,
        #: with the source store (a worker that joins later is checked against it too).
        self._proofs: dict[str, tuple[bytes, asyncio.Task[dict[str, int]]]] = {}
        #: Workers that found files on their disk at start: the only ones a check asks.
        self._found_files: set[str] = set()
        self.coverage = DatasetCoverage(
            self._describe, self._cached_flags, settings.coverage_interval
        )
        scheduler.handlers.update(self.handlers)
        self.history = CacheHistory(scheduler)
        self.history.start()
        add_http_routes(scheduler)
        bind_prometheus(scheduler)

    @property
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Scheduler handlers by name: each the method of the same name."""
        return {
            "zarr_cache_index": self.zarr_cache_index,
            "zarr_cache_sync": self.zarr_cache_sync,
            "zarr_cache_write": self.zarr_cache_write,
            "zarr_cache_evict": self.zarr_cache_evict,
            "zarr_cache_prove": self.zarr_cache_prove,
            "zarr_cache_cluster_stats": self.zarr_cache_cluster_stats,
            "zarr_cache_cached": self.zarr_cache_cached,
        }

    async def zarr_cache_index(self) -> list[dict[str, str] | None]:
        """Where each index shard is (see :meth:`IndexShards.locate`)."""
        return await self.shards.locate()

    async def apply(self, settings: CacheSettings, worker_plugin: WorkerPlugin) -> None:
        """Install (or re-install) the worker plugin with ``settings`` on every worker."""
        self.settings = self.writes.settings = settings
        self.installed = True
        # No shard is placed while the workers set up: the first to be ready would get
        # every shard (shards stay where they are created).
        self.shards.paused = True
        try:
            await self.scheduler.register_worker_plugin(
                comm=None, plugin=dumps(worker_plugin), name=WORKER_PLUGIN_NAME, idempotent=False
            )
        finally:
            self.shards.paused = False
        self.shards.settings = settings
        if settings.index_shards != len(self.shards.locations):
            await self.shards.reshard(settings.index_shards)
        elif any(loc is not None for loc in self.shards.locations):
            with contextlib.suppress(IndexUnavailableError):
                await self.index.configure(settings.max_age_seconds, settings.policy)

    # -- the write history -----------------------------------------------------------------
    async def zarr_cache_sync(
        self, worker: str, epoch: bytes | None, seq: int, found_files: bool = False
    ) -> bytes:
        """A worker catches up: the writes after ``seq`` (of ``epoch``), and renews its lease.

        ``seq`` is also what the worker has applied: it counts as its acknowledgement.
        ``found_files`` (its first sync): it holds files from before it started, which the
        checks of datasets (:meth:`zarr_cache_prove`) must reach.
        """
        reply, new = await self.writes.catch_up(worker, epoch, seq)
        if new:  # a worker that can host index shards
            self.shards.ensure()
        if new and found_files:  # and may hold files of datasets checked already
            self._found_files.add(worker)
            for prefix, (store, _) in self._proofs.items():
                self._spawn(self._prove(prefix, store, to=[worker]))
        return pack(reply)

    async def zarr_cache_write(
        self, keys: bytes, prefixes: bytes, origin: str | None = None
    ) -> bytes:
        """Record a write and make sure no worker serves the bytes it replaced.

        Returns when every worker has applied it, or, for a worker it cannot reach, once
        that worker's lease has run out (it then serves nothing until it catches up); see
        :meth:`WriteCoordinator.write`.  ``origin``, a worker that already applied the
        write itself (its loop is blocked waiting for it), is not asked.
        """
        return pack(await self.writes.write(unpack(keys), unpack(prefixes), origin))

    async def zarr_cache_evict(self, keys: bytes, prefixes: bytes) -> dict[str, Any]:
        """Drop every cached copy of ``keys`` and below ``prefixes``; the source is untouched.

        An eviction is a write that changed no byte: it goes through the write history
        like one (fetches in flight are poisoned, absent workers learn it when they catch
        up).  Returns ``seq``, ``unreached``, and the ``objects`` and ``bytes`` dropped in
        all and on each of ``workers``.
        """
        seq, replies, unreached = await self.writes.evict(unpack(keys), unpack(prefixes))
        dropped = {w: unpack(r) for w, r in replies.items()}
        workers = {w: {"objects": d.objects, "bytes": d.nbytes} for w, d in dropped.items()}
        return {
            "seq": seq,
            "unreached": unreached,
            "objects": sum(w["objects"] for w in workers.values()),
            "bytes": sum(w["bytes"] for w in workers.values()),
            "workers": workers,
        }

    async def zarr_cache_prove(self, prefix: str, store: bytes, dataset: bytes) -> dict[str, int]:
        """Have every worker check its files of an earlier cluster below ``prefix``.

        ``store`` is the dataset's source store and ``dataset`` the ``ClusterCacheStore``
        read (pickled; passed on, never opened here).  The first call for a prefix runs the
        check; later ones wait for it.  Returns the files shown ``current`` (served again)
        and ``stale`` (deleted) in all.  The dataset joins the dashboard's table.
        """
        self.coverage.add(prefix, dataset)
        if prefix not in self._proofs:
            self._proofs[prefix] = (store, asyncio.ensure_future(self._prove(prefix, store)))
        return await asyncio.shield(self._proofs[prefix][1])

    async def _prove(
        self, prefix: str, store: bytes, to: Collection[str] | None = None
    ) -> dict[str, int]:
        """The check on every worker that found files at start, or those in ``to``.

        A cluster started on empty disks asks nobody: a dataset's first read then waits
        for no worker (a frozen one included).
        """
        replies = await self.broadcast(
            "zarr_cache_apply_prove",
            to=self._found_files if to is None else to,
            timeout=self.settings.prove_timeout,
            prefix=prefix,
            store=store,
        )
        checked = [ProveReply(*unpack(r)) for r in replies.values() if isinstance(r, bytes)]
        found = {"current": sum(c.current for c in checked), "stale": sum(c.stale for c in checked)}
        if any(found.values()):
            logger.info("zarr cache: files of an earlier cluster below %r: %s", prefix, found)
        return found

    # -- the index shards ------------------------------------------------------------------
    async def _index_created(self, shard: int | None) -> None:
        """Workers register their files with a new shard (every shard: ``None``) now.

        Not at their next miss: until then the new shard would send other workers to the
        source for those keys.
        """
        await self.broadcast("zarr_cache_index_moved", shard=shard)

    def remove_worker(self, worker: str) -> None:
        """A worker left: forget it, tell the others, drop its index entries.

        Shards it hosted are created again elsewhere; the other shards keep their entries
        except the departed worker's.
        """
        self.writes.left(worker)
        self._found_files.discard(worker)
        self._spawn(self.broadcast("zarr_cache_worker_left", address=worker))
        if len(self.shards.lost(worker)) < len(self.shards.locations):
            self._spawn(self._remove_from_index(worker))

    async def _remove_from_index(self, worker: str) -> None:
        with contextlib.suppress(IndexUnavailableError):
            await self.index.remove_worker(worker)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop background work and close the internal client."""
        self.history.stop()
        await self.coverage.close()
        for task in self._background:
            task.cancel()
        await self.shards.close()

    # -- cluster-wide operations ---------------------------------------------------------
    async def broadcast(
        self,
        op: str,
        *,
        skip: str | None = None,
        to: Collection[str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Call worker handler ``op`` on every worker with a cache; replies by address.

        Only workers that caught up with the write history at least once (so have the
        handlers) are asked, all but ``skip`` (only those in ``to``, if given), each for at
        most ``timeout`` seconds (default: the write lease).  Unreachable workers are left
        out.
        """
        targets = [w for w in self._reachable() if w != skip and (to is None or w in to)]
        timeout = self.settings.write_lease if timeout is None else timeout
        # return_exceptions: a call cancelled as the scheduler closes must not leave the
        # gathering future's exception unretrieved (logged at exit).
        replies = await asyncio.gather(
            *(self._ask(w, op, timeout, **kwargs) for w in targets), return_exceptions=True
        )
        answered = {}
        for worker, reply in zip(targets, replies, strict=True):
            if isinstance(reply, Exception):
                logger.warning("zarr cache %s failed on %s: %r", op, worker, reply)
            elif reply is not _UNREACHED and not isinstance(reply, BaseException):
                answered[worker] = reply
        return answered

    def _reachable(self) -> list[str]:
        """Workers with a cache (caught up at least once) the scheduler still knows."""
        return self.writes.reachable()

    def _cache_workers(self) -> Collection[str]:
        """Workers with a cache: those that may host index shards."""
        return self.writes.workers.keys()

    async def _ask(self, worker: str, op: str, timeout: float, **kwargs: Any) -> Any:
        """Worker handler ``op``'s reply, or ``_UNREACHED`` (logged) within ``timeout``."""
        try:
            call = getattr(self.scheduler.rpc(worker), op)
            return await asyncio.wait_for(call(**kwargs), timeout)
        except (OSError, TimeoutError) as err:
            logger.info("zarr cache %s did not reach %s: %s", op, worker, err)
            return _UNREACHED

    async def _describe(self, dataset: bytes) -> DatasetObjects:
        """A dataset's name and objects, listed by the first worker that answers."""
        for worker in self._reachable():
            reply = await self._ask(
                worker, "zarr_cache_dataset_objects", self.settings.prove_timeout, dataset=dataset
            )
            if reply is not _UNREACHED:
                return DatasetObjects(*unpack(reply))
        raise ZarrCacheError("no worker answered for a listing of the dataset")

    async def _cached_flags(self, keys: list[str]) -> list[bool]:
        try:
            return await self.index.cached(keys)
        except IndexUnavailableError:
            return [False] * len(keys)

    async def zarr_cache_cached(self, keys: str) -> str:
        """Whether each cache key has a ready copy on some worker: ``"0"``/``"1"`` each.

        ``keys`` is a JSON list, and the reply a string: bytes between a client and the
        scheduler arrive still serialized.  All ``"0"`` without an index.
        """
        cached = await self._cached_flags(json.loads(keys))
        return "".join("1" if c else "0" for c in cached)

    async def zarr_cache_cluster_stats(self) -> dict[str, Any]:
        """Counters of every worker, their totals, and the index's own summary."""
        replies = await self.broadcast("zarr_cache_counters")
        workers = {addr: r for addr, r in replies.items() if isinstance(r, dict)}
        try:
            index = await self.index.summary()
        except IndexUnavailableError:
            index = None
        return {"total": total_of(workers), "workers": workers, "index": index}


_UNREACHED = object()


def scheduler_state(scheduler: Scheduler) -> ZarrCacheScheduler | None:
    """The cache's state on ``scheduler``, if the plugin is registered."""
    state = scheduler.extensions.get(EXTENSION_NAME)
    return state if isinstance(state, ZarrCacheScheduler) else None
