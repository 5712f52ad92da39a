"""``WorkerCache``: one worker's share of the cluster cache.

One instance per worker process, shared by all its task threads.  Store reads arrive on
zarr's own event loop; everything that talks to other processes (index actor, peers,
scheduler) runs on the worker's loop, reached with :meth:`WorkerCache.on_worker_loop`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.metrics import context_meter
from distributed.protocol import to_serialize
from tornado.ioloop import PeriodicCallback

from dask_zarr_cache._disk import DiskCache, checksum
from dask_zarr_cache._exceptions import InvalidCacheKeyError
from dask_zarr_cache._index import FETCH, Item, join_items, join_keys, split_keys
from dask_zarr_cache._index_client import IndexClient, IndexUnavailableError
from dask_zarr_cache._keys import base_key
from dask_zarr_cache._stats import CacheCounters
from dask_zarr_cache.dashboard import METRIC_PREFIX, register_prometheus_collector

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from distributed import Worker

    from dask_zarr_cache._config import CacheSettings

__all__ = ["EXTENSION_NAME", "WorkerCache"]

logger = logging.getLogger(__name__)

#: Key of the :class:`WorkerCache` in ``worker.extensions``.
EXTENSION_NAME = "zarr_cache"

_PEER_OK, _PEER_ABSENT, _PEER_MISSING = "ok", "absent", "missing"

#: Object bytes as the cache hands them around: file reads are zero-copy memoryviews.
Payload = bytes | memoryview

#: Returned by a peer read when the source itself has no such key.
_ABSENT = memoryview(b"")
#: How many "which peer served this key" hints a worker keeps (oldest dropped first).
_MAX_OWNER_HINTS = 200_000


@dataclass(frozen=True, slots=True)
class _LocalEntry:
    size: int
    checksum: int
    created: float
    tag: int = field(default_factory=itertools.count(1).__next__)  # see ``_index.Item``

    def item(self, key: str) -> Item:
        return key, self.size, self.checksum, self.tag


def _counter_reader(cache: WorkerCache, name: str) -> Callable[[Worker], int]:
    def read(worker: Worker) -> int:
        return getattr(cache.counters, name)

    return read


def cache_directory(worker: Worker, settings: CacheSettings) -> str:
    """Where ``worker`` keeps its cache files.

    With ``settings.directory`` set, each worker gets a subdirectory named after its
    (stable) worker name so several workers on one host never share files.
    """
    if settings.directory is None:
        return os.path.join(worker.local_directory, "zarr-cache")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(worker.name)) or "worker"
    return os.path.join(settings.directory, name)


class WorkerCache:
    """A worker's cache: local files, in-process single-flight, index and peer traffic.

    Parameters
    ----------
    worker : distributed.Worker
        The worker this cache lives in.
    settings : CacheSettings
        Budget, TTL and directory.

    """

    def __init__(self, worker: Worker, settings: CacheSettings) -> None:
        self.worker = worker
        self.settings = settings
        self.counters = CacheCounters(capacity=settings.max_size)
        self._caching_enabled = True
        self.disk = DiskCache(cache_directory(worker, settings))
        self.index = IndexClient(worker.scheduler, worker.rpc, self._register)
        self._timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
        self._lock = threading.Lock()
        # Insertion order is creation order: the TTL sweep walks it from the front.
        self._entries: dict[str, _LocalEntry] = {}
        self._inflight: dict[str, concurrent.futures.Future[Payload | None]] = {}
        self._poisoned: set[str] = set()  # in-flight keys invalidated by a write
        # Which peer served a key last: warm reads skip the index round trip. A wrong
        # hint costs one "missing" answer, never wrong bytes (peers serve only what
        # they hold now, verified).
        self._owner_hints: dict[str, str] = {}
        self._accessed: set[str] = set()
        self._dropped: dict[str, Item] = {}
        self._flush_lock = asyncio.Lock()
        interval = parse_timedelta(dask.config.get("zarr-cache.flush-interval"))
        self._flusher = PeriodicCallback(self.flush, interval * 1000)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt verified files already on disk and start the periodic flush."""
        files = await asyncio.to_thread(lambda: list(self.disk.scan()))
        with self._lock:
            for f in sorted(files, key=lambda f: f.mtime):
                self._add_entry(f.key, _LocalEntry(f.size, f.checksum, f.mtime))
        self.worker.handlers["zarr_cache_get"] = self.handle_get
        for name in self.counters.as_dict():  # columns of the dashboard's Workers table
            self.worker.metrics[METRIC_PREFIX + name] = _counter_reader(self, name)
        register_prometheus_collector()
        self._flusher.start()
        # Register the adopted files now (in the background: the index may not exist yet).
        self.worker.loop.add_callback(self.flush)

    async def close(self) -> None:
        """Stop flushing; files stay on disk for the next cache on this directory."""
        self._flusher.stop()
        for name in self.counters.as_dict():
            self.worker.metrics.pop(METRIC_PREFIX + name, None)
        await self.flush()

    async def _register(self, call: Callable[..., Awaitable[Any]]) -> None:
        """Tell a newly found index this worker's budget and the files on its disk."""
        with self._lock:
            items = join_items(e.item(k) for k, e in self._entries.items())
        to_delete = await call("register", self.worker.address, self.settings.max_size, items)
        await asyncio.to_thread(self._drop, split_keys(to_delete), evicted=True)

    # -- event-loop hop --------------------------------------------------------------
    async def on_worker_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the worker's event loop and await its result from any loop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.worker.loop.asyncio_loop)
        return await asyncio.wrap_future(future)

    # -- the read path (zarr's loop) -----------------------------------------------------
    async def get(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        """Return the bytes of cache key ``key``, reading the source at most once cluster-wide.

        Parameters
        ----------
        key : str
            Cache key (see :func:`dask_zarr_cache._keys.cache_key`).
        read_source : callable
            Coroutine function reading the object from the source store; ``None`` if absent.
            Its exceptions propagate to the caller unchanged.

        """
        data = await self._read_local(key)
        if data is not None:
            return data
        with self._lock:
            future = self._inflight.get(key)
            leader = future is None
            if leader:
                future = self._inflight[key] = concurrent.futures.Future()
                self._poisoned.discard(key)
        if not leader:
            return await asyncio.wrap_future(future)
        try:
            data = await self._load(key, read_source)
        except BaseException as err:
            future.set_exception(err)
            raise
        else:
            future.set_result(data)
            return data
        finally:
            with self._lock:
                self._inflight.pop(key, None)
                self._poisoned.discard(key)

    async def _read_local(self, key: str) -> Payload | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._is_expired(entry):
            await asyncio.to_thread(self._drop, [key], expired=True)
            return None
        with context_meter.meter("zarr-cache-local-read"):
            data = await asyncio.to_thread(self.disk.read, key, entry.checksum)
        if data is None:  # deleted or corrupt on disk: forget it, fetch again
            await asyncio.to_thread(self._drop, [key])
            return None
        with self._lock:
            self.counters.hits += 1
            self.counters.hit_bytes += len(data)
            self._accessed.add(key)
        context_meter.digest_metric("zarr-cache-hit", 1, "count")
        return data

    async def _load(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        with self._lock:
            self.counters.misses += 1
        owner = self._owner_hints.get(key)
        if owner is not None:  # warm path: straight to the peer that served it last time
            data = await self._from_peer(owner, key)
            if data is _ABSENT:
                return None
            if data is not None:
                return data
            self._owner_hints.pop(key, None)
        unreachable = ""
        # Second round only after a peer failed: the index then drops that peer's entry,
        # so one asker (maybe this one) re-fetches instead of everyone reading the source.
        for _ in range(2):
            try:
                decision, address = await self.on_worker_loop(self._acquire(key, unreachable))
            except (IndexUnavailableError, OSError, TimeoutError) as err:
                logger.debug("zarr cache index unavailable (%s); reading %s from source", err, key)
                break
            if decision == FETCH:
                return await self._fetch_and_cache(key, read_source)
            data = await self._from_peer(address, key)
            if data is _ABSENT:
                return None
            if data is not None:
                return data
            unreachable = address
        return await self._read_source_uncached(read_source)

    async def _from_peer(self, address: str, key: str) -> Payload | None:
        """Bytes of ``key`` from peer ``address``; ``None`` if it has not got them.

        Returns the :data:`_ABSENT` sentinel if the peer's fetch found the key missing at
        the source.
        """
        with context_meter.meter("zarr-cache-peer-fetch"):
            status, data = await self.on_worker_loop(self._peer_get(address, key))
        if status == _PEER_ABSENT:
            return _ABSENT
        if status != _PEER_OK:
            return None
        context_meter.digest_metric("zarr-cache-peer-bytes", len(data), "bytes")
        with self._lock:
            self.counters.peer_reads += 1
            self.counters.peer_bytes += len(data)
            if len(self._owner_hints) >= _MAX_OWNER_HINTS:
                self._owner_hints.pop(next(iter(self._owner_hints)))
            self._owner_hints[key] = address
        return data

    async def _read_source_uncached(
        self, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        with context_meter.meter("zarr-cache-source-fetch"):
            data = await read_source()
        with self._lock:
            self.counters.fallbacks += 1
            if data is not None:
                self.counters.remote_reads += 1
                self.counters.remote_bytes += len(data)
        return data

    async def _fetch_and_cache(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        try:
            with context_meter.meter("zarr-cache-source-fetch"):
                data = await read_source()
        except BaseException:
            await self._abandon(key)
            raise
        if data is None:
            await self._abandon(key)
            return None
        with self._lock:
            self.counters.remote_reads += 1
            self.counters.remote_bytes += len(data)
        if len(data) > self.settings.max_size or not self._caching_enabled:
            await self._abandon(key)
            return data
        try:
            crc = await asyncio.to_thread(self.disk.write, key, data)
        except OSError as err:
            self._disable_caching(err)
            await self._abandon(key)
            return data
        entry = _LocalEntry(len(data), crc, time.time())
        with self._lock:
            poisoned = key in self._poisoned
            if not poisoned:
                self._add_entry(key, entry)
        if poisoned:  # a write invalidated the key while we read it: do not keep old bytes
            await asyncio.to_thread(self.disk.delete, key)
            await self._abandon(key)
            return data
        try:
            await self.on_worker_loop(self._commit(entry.item(key)))
        except (TimeoutError, IndexUnavailableError, OSError) as err:
            logger.debug("zarr cache commit of %s failed: %s", key, err)
        return data

    async def _abandon(self, key: str) -> None:
        try:
            await self.on_worker_loop(self.index.call("abandon", self.worker.address, key))
        except (TimeoutError, IndexUnavailableError, OSError) as err:
            logger.debug("zarr cache abandon of %s failed: %s", key, err)

    def _disable_caching(self, err: OSError) -> None:
        self.counters.disk_errors += 1
        if self._caching_enabled:
            self._caching_enabled = False
            self.counters.caching_disabled = 1
            logger.warning(
                "zarr cache directory %s is not writable (%s); this worker now reads "
                "through to the source without caching",
                self.disk.root,
                err,
            )

    # -- index and peer calls (worker loop) ---------------------------------------------
    async def _acquire(self, key: str, unreachable: str = "") -> tuple[str, str]:
        reply = await self.index.call("acquire", self.worker.address, key, unreachable)
        decision, _, address = reply.partition(" ")
        return decision, address

    async def _commit(self, item: Item) -> None:
        evicted, rejected = await self.index.call(
            "commit", self.worker.address, self.settings.max_size, join_items([item])
        )
        await asyncio.to_thread(self._drop, split_keys(evicted), evicted=True)
        await asyncio.to_thread(self._drop, split_keys(rejected))

    async def _peer_get(self, address: str, key: str) -> tuple[str, Payload | None]:
        try:
            reply = await asyncio.wait_for(
                self.worker.rpc(address).zarr_cache_get(key=key), self._timeout
            )
        except (TimeoutError, OSError) as err:
            logger.debug("zarr cache peer %s failed for %s: %s", address, key, err)
            return _PEER_MISSING, None
        status = reply.get("status")
        if status != _PEER_OK:
            return (_PEER_ABSENT if status == _PEER_ABSENT else _PEER_MISSING), None
        data = reply["data"]
        if checksum(data) != reply["checksum"]:
            logger.warning("zarr cache peer %s sent corrupt bytes for %s", address, key)
            return _PEER_MISSING, None
        return _PEER_OK, data

    # -- handlers for peers and the scheduler (worker loop) ---------------------------------
    async def handle_get(self, key: str) -> dict[str, Any]:
        """Serve a cached object, or the result of its in-flight fetch, to a peer.

        Only keys in this cache are served; anything else gets ``{"status": "missing"}``.
        """
        future = self._inflight.get(key)
        if future is not None:
            try:
                data = await asyncio.wait_for(asyncio.wrap_future(future), self._timeout * 10)
            except Exception:
                return {"status": _PEER_MISSING}
            if data is None:
                return {"status": _PEER_ABSENT}
            return self._peer_reply(key, data, checksum(data))
        entry = self._entries.get(key)
        if entry is None or self._is_expired(entry):
            return {"status": _PEER_MISSING}
        try:
            data = await asyncio.to_thread(self.disk.read, key, entry.checksum)
        except InvalidCacheKeyError:
            return {"status": _PEER_MISSING}
        if data is None:
            await asyncio.to_thread(self._drop, [key])
            return {"status": _PEER_MISSING}
        with self._lock:
            self._accessed.add(key)
        return self._peer_reply(key, data, entry.checksum)

    def _peer_reply(self, key: str, data: Payload, crc: int) -> dict[str, Any]:
        with self._lock:
            self.counters.peer_served += 1
            self.counters.peer_served_bytes += len(data)
        return {"status": _PEER_OK, "data": to_serialize(data), "checksum": crc}

    async def handle_invalidate(self, keys: str, prefixes: str) -> int:
        """Drop local entries of written keys (and their byte ranges) and key prefixes.

        In-flight fetches of those keys are poisoned so their (possibly old) bytes are not
        cached.  Returns the number of entries dropped.
        """
        bases = set(split_keys(keys))
        starts = tuple(split_keys(prefixes))

        def matches(k: str) -> bool:
            return base_key(k) in bases or (bool(starts) and k.startswith(starts))

        with self._lock:
            self._poisoned.update(k for k in self._inflight if matches(k))
            doomed = [k for k in self._entries if matches(k)]
        await asyncio.to_thread(self._drop, doomed)
        return len(doomed)

    async def handle_index_moved(self) -> None:
        """A new index actor exists: register this worker's files with it right away."""
        self.index.reset()
        await self.flush()

    async def handle_stats(self) -> dict[str, int]:
        """Return the counters of this worker."""
        with self._lock:
            return self.counters.as_dict()

    # -- periodic flush (worker loop) ---------------------------------------------------
    async def flush(self) -> None:
        """Expire old local files and send batched access records to the index."""
        if self._flush_lock.locked():
            return
        async with self._flush_lock:
            await asyncio.to_thread(self._sweep_expired)
            with self._lock:
                accessed, self._accessed = self._accessed, set()
                dropped, self._dropped = self._dropped, {}
            if not accessed and not dropped and self.index.connected:
                return
            try:
                expired, known = await self.index.call(
                    "touch", self.worker.address, join_keys(accessed), join_items(dropped.values())
                )
            except (TimeoutError, IndexUnavailableError, OSError):
                return
            if not known:
                self.index.reset()
            await asyncio.to_thread(self._drop, split_keys(expired), expired=True)

    def _sweep_expired(self) -> None:
        if self.settings.max_age_seconds is None:
            return
        expired = []
        with self._lock:
            for key, entry in self._entries.items():
                if not self._is_expired(entry):
                    break
                expired.append(key)
        self._drop(expired, expired=True)

    # -- local bookkeeping -----------------------------------------------------------
    def _is_expired(self, entry: _LocalEntry) -> bool:
        ttl = self.settings.max_age_seconds
        return ttl is not None and time.time() - entry.created > ttl

    def _add_entry(self, key: str, entry: _LocalEntry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.counters.bytes -= old.size
        self._entries[key] = entry
        self.counters.bytes += entry.size
        self.counters.entries = len(self._entries)

    def _drop(self, keys: list[str], *, evicted: bool = False, expired: bool = False) -> None:
        """Delete files and entries of ``keys`` (runs in a thread)."""
        for key in keys:
            with self._lock:
                entry = self._entries.pop(key, None)
                if entry is None:
                    continue
                self.counters.bytes -= entry.size
                self.counters.entries = len(self._entries)
                self.counters.evictions += evicted
                self.counters.expired += expired
                if not evicted:
                    self._dropped[key] = entry.item(key)
            try:
                self.disk.delete(key)
            except (OSError, InvalidCacheKeyError) as err:
                logger.debug("could not delete cache file %s: %s", key, err)


def worker_cache_of(worker: Worker) -> WorkerCache | None:
    """The cache installed on ``worker``, if any."""
    cache = worker.extensions.get(EXTENSION_NAME)
    return cache if isinstance(cache, WorkerCache) else None


def worker_cache() -> WorkerCache | None:
    """The cache of the worker this code runs in, or ``None`` (client, no plugin).

    Inside a task ``get_worker()`` names the worker. Threads a task starts do not inherit
    that context, so otherwise the process's only worker is used, if it has just one.
    """
    from distributed import Worker, get_worker

    try:
        return worker_cache_of(get_worker())
    except ValueError:
        pass
    workers = list(Worker._instances)
    return worker_cache_of(workers[0]) if len(workers) == 1 else None
