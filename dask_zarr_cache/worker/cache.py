"""``WorkerCache``: the I/O shell of one worker's share of the cluster cache.

One instance per worker process, shared by all its task threads.  The bookkeeping lives in
:class:`~dask_zarr_cache.worker.state.LocalState` (pure); this class does the disk I/O (in
threads), the index and peer calls and the catch-up with the scheduler's write history.
Store reads arrive on zarr's own event loop; everything that talks to other processes runs
on the worker's loop, reached through one facade,
:class:`~dask_zarr_cache.core.loops.WorkerLoop`.  It takes what it needs (address, rpcs,
loop, directory) as arguments, so tests can drive it with fakes.

The read path, :meth:`WorkerCache.get` and :meth:`WorkerCache._load`, in order: the lease
(else the source, uncached), the local file, the load in flight here, the owner hint, the
index's decision (fetch from the source, or ask the peer it names), the source.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from typing import TYPE_CHECKING, Any

from distributed.metrics import context_meter

from dask_zarr_cache.core.clock import Clock, wall_clock
from dask_zarr_cache.core.interfaces import WorkerCacheAPI
from dask_zarr_cache.core.loops import WorkerLoop
from dask_zarr_cache.core.protocol import (
    FETCH,
    NOBODY,
    EvictReply,
    Payload,
    pack,
    unpack,
)
from dask_zarr_cache.index.client import IndexClient
from dask_zarr_cache.worker.disk import DiskCache
from dask_zarr_cache.worker.earlier_files import EarlierFiles
from dask_zarr_cache.worker.flights import ASKING, PEER, SOURCE, Fetch
from dask_zarr_cache.worker.guarded_disk import GuardedDisk
from dask_zarr_cache.worker.kept_writes import KeptWrites
from dask_zarr_cache.worker.peers import MISSING, UNAVAILABLE, Peers, read_file
from dask_zarr_cache.worker.state import LocalEntry, LocalState
from dask_zarr_cache.worker.upkeep import Upkeep
from dask_zarr_cache.writes.catch_up import catch_up

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from dask_zarr_cache.core.config import CacheSettings
    from dask_zarr_cache.core.protocol import Item, WriteReply

__all__ = ["WorkerCache"]

logger = logging.getLogger(__name__)


class WorkerCache(WorkerCacheAPI):
    """A worker's cache: local files, in-process single-flight, index and peer traffic.

    Implements the seams of :mod:`~dask_zarr_cache.core.interfaces`, through which the
    store and the writes layer call it.

    Parameters
    ----------
    address : str
        This worker's address (how the index and peers name it).
    scheduler : rpc
        An rpc to the scheduler (``worker.scheduler``).
    rpc : callable
        Connection pool: ``rpc(address)`` returns an rpc to a peer (``worker.rpc``).
    loop : asyncio.AbstractEventLoop
        The worker's event loop, where ``scheduler`` and ``rpc`` may be used.
    settings : CacheSettings
        Budget, TTL, lease.
    directory : str
        This worker's cache directory.
    timeout : float
        Seconds to wait for the scheduler, the index or a peer.
    clock : callable
        Seconds (wall clock); tests inject their own.

    """

    def __init__(
        self,
        address: str,
        scheduler: Any,
        rpc: Callable[[str], Any],
        loop: asyncio.AbstractEventLoop,
        settings: CacheSettings,
        directory: str,
        timeout: float = 30.0,
        clock: Clock = wall_clock,
    ) -> None:
        self.address = address
        self.pid = os.getpid()  # a process forked from a task has the object, not the loop
        self.scheduler = scheduler
        self.rpc = rpc
        self.worker_loop = WorkerLoop(loop, settings.loop_wait)
        self.settings = settings
        self.timeout = timeout
        self.clock = clock
        self.state = LocalState(
            settings.max_age_seconds,
            settings.write_lease,
            clock,
            capacity=settings.max_size,
            policy=settings.policy,
            peer_backoff=settings.peer_backoff,
            revalidate_after=settings.revalidate_after,
            revalidate_grace=settings.revalidate_grace,
            memory_size=settings.memory_size,
            memory_object_limit=settings.memory_object_limit,
        )
        self.counters = self.state.counters
        self.disk = DiskCache(directory, settings.file_mode, settings.trusted_parent)
        self.index = IndexClient(address, scheduler, rpc, on_connect=self._register)
        self.peers = Peers(
            self.state,
            self.disk,
            rpc,
            self.worker_loop,
            settings.read_timeout,
            clock,
            settings.loop_wait,
        )
        self.index.timeout = timeout
        self.guarded_disk = GuardedDisk(self.disk, self.state, clock, settings.disk_retry)
        self.earlier_files = EarlierFiles(
            self.state, scheduler, self.index, self.worker_loop, settings, clock, self._delete
        )
        self.upkeep = Upkeep(
            self.state,
            self.index,
            self.sync,
            self.earlier_files.sources,
            settings,
            clock,
            self._delete,
        )
        self.kept_writes = KeptWrites(
            self.state,
            self.index,
            settings.max_size,
            self._keep_file,
            self._delete,
            self._in_background,
            clock,
        )
        self._closed = False
        self._background: set[concurrent.futures.Future[Any]] = set()

    # -- lifecycle (worker loop) ---------------------------------------------------------
    async def start(self) -> None:
        """Claim the directory, find the files on it, and catch up with the write history.

        Files found on disk are served only once the scheduler's write history shows no
        write replaced them since they were read (see :meth:`sync`).
        """
        if await asyncio.to_thread(self.guarded_disk.usable):
            self.state.found(await asyncio.to_thread(lambda: list(self.disk.scan())))
        await self.flush()  # catches up with the write history first

    async def close(self, finish_loads: bool = True) -> None:
        """Stop caching and release the directory; the files stay for the next start.

        With ``finish_loads`` (a new cache takes this directory over in this process),
        loads in flight finish first, so every file is complete when the next cache scans
        it.  A closing worker does not wait for them: a file half-written stays in
        ``tmp/``, which the next start clears.  Nothing is sent anywhere: the next cache
        registers what is on disk (the index takes the disk as the truth), and a closing
        worker's scheduler may already be gone (connecting would wait out the timeout).
        """
        self._closed = self.upkeep.closed = True  # loads read on, but write no more files
        pending = self.state.pending_fetches() if finish_loads else []
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=self.timeout)
        await asyncio.to_thread(self.disk.close)

    # -- the read path (zarr's loop or the worker's) ---------------------------------------
    async def get(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        """Return the bytes of cache key ``key``, reading the source at most once cluster-wide.

        Parameters
        ----------
        key : str
            Cache key (see :func:`dask_zarr_cache.identity.keys.cache_key`).
        read_source : callable
            Coroutine function reading the object from the source store; ``None`` if absent.
            Its exceptions propagate to the caller unchanged.

        """
        with self.state.reading():
            return await self._get(key, read_source)

    async def _get(
        self, key: str, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        if not self.state.can_serve():  # may have missed a write: do not trust the files
            return await self._read_source_uncached(read_source)
        data = await self._read_local(key)
        if data is not None:
            return data
        fetch, leader = self.state.begin_fetch(key)
        if not leader:
            try:
                return await fetch.outcome()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                return await self._read_source_uncached(read_source)  # the leader was cancelled
        try:
            data = await self._load(key, fetch, read_source)
        except BaseException as err:
            fetch.future.set_exception(err)
            raise
        else:
            fetch.future.set_result(data)
            return data
        finally:
            self.state.end_fetch(key, fetch)

    async def _read_local(self, key: str) -> Payload | None:
        entry, expired, data = self.state.local_hit(key)  # a copy in memory: counted
        if data is None:
            with context_meter.meter("zarr-cache-local-read"):
                data = await read_file(self.state, self.disk, key, entry, expired)
            if entry is None or data is None:  # not here, expired, or damaged: fetch it
                return None
            self.state.record_hit(key, entry, data)
        context_meter.digest_metric("zarr-cache-hit", 1, "count")
        return data

    async def _load(
        self, key: str, fetch: Fetch, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        # However the index and peers answer (or not: a frozen host), this read waits for
        # them at most ``read_timeout`` in all, then reads the source itself.  ``fetch``'s
        # phase tells peers asking for ``key`` meanwhile whether they may wait on it.
        deadline = self.clock() + self.settings.read_timeout
        owner = self.state.owner_hint(key)
        if owner is not None:  # warm path: straight to the peer that served it last time
            fetch.enter(PEER)
            status, data = await self.peers.fetch(owner, key, deadline - self.clock())
            if status != MISSING:
                return data
            self.state.drop_hint(key)
        unreachable = NOBODY
        # A second round only after a peer failed: the index then drops that peer's entry,
        # so one asker (maybe this one) re-fetches instead of everyone reading the source.
        for _ in range(2):
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            fetch.enter(ASKING)
            try:
                with self.state.timed("index_wait_us"):
                    decision = await asyncio.wait_for(
                        self.worker_loop.call(self.index.acquire_one(key, unreachable)),
                        remaining,
                    )
            except UNAVAILABLE as err:
                logger.debug("zarr cache index unavailable (%s); reading %s from source", err, key)
                break
            if decision.kind == FETCH:
                logger.debug("zarr cache fetches %r (after %r)", key, unreachable)
                return await self._fetch_and_cache(key, fetch, read_source, decision.reads)
            unreachable = (decision.address, decision.claim)
            wait = self.state.peer_patience(
                decision.address,
                deadline - self.clock(),
                self.settings.peer_probe_timeout,
                self.settings.read_timeout,
            )
            fetch.enter(PEER)
            if wait <= 0:
                continue
            status, data = await self.peers.fetch(
                decision.address, key, wait, deadline - self.clock()
            )
            if status != MISSING:
                return data
            logger.debug("zarr cache: %s missing at %r (%s)", key, decision.address, decision)
        fetch.enter(SOURCE)
        logger.debug(
            "zarr cache reads %r uncached (hint %r, last asked %r)", key, owner, unreachable
        )
        return await self._read_source_uncached(read_source)

    async def _read_source_uncached(
        self, read_source: Callable[[], Awaitable[Payload | None]]
    ) -> Payload | None:
        with self.state.timed("source_wait_us"):
            data = await read_source()
        self.state.count(fallbacks=1)
        if data is not None:
            self.state.count(remote_reads=1, remote_bytes=len(data))
        return data

    async def _fetch_and_cache(
        self,
        key: str,
        fetch: Fetch,
        read_source: Callable[[], Awaitable[Payload | None]],
        reads: int = 0,
    ) -> Payload | None:
        """Read the source as the cluster's one fetcher of ``key``; keep the bytes if we may.

        Every way out releases the cluster-wide claim at once, except a successful commit,
        which happens in the background after the reader has its bytes.
        """
        fetch.enter(SOURCE)
        kept = None
        try:
            created = self.clock()
            with self.state.timed("source_wait_us"):
                data = await read_source()
            if data is None:
                return None
            self.state.count(remote_reads=1, remote_bytes=len(data))
            epoch = self.state.epoch
            if len(data) > self.settings.max_size or fetch.poisoned or epoch is None:
                return data
            with self.state.timed("file_write_us"):
                kept = await self._keep_file(key, data, fetch, epoch, fetch.seq, created, reads)
            if kept is not None:
                self._in_background(self._commit(kept))
            return data
        finally:
            if kept is None and not self.state.superseded(key, fetch):
                logger.debug("zarr cache keeps no copy of %r (poisoned: %s)", key, fetch.poisoned)
                self._in_background(self._abandon(key))

    async def _keep_file(
        self,
        key: str,
        data: Payload,
        fetch: Fetch,
        epoch: bytes,
        seq: int,
        created: float,
        reads: int = 0,
    ) -> Item | None:
        """Write ``key``'s file and admit it as ``fetch``'s; the copy, or ``None`` if not kept.

        Not kept: the cache closed, the disk failed, a write poisoned ``fetch``, or the
        budget keeps the others.
        """
        if self._closed:
            return None
        crc = await asyncio.to_thread(self.guarded_disk.write, key, data, epoch, seq, created)
        if crc is None:
            return None
        entry = LocalEntry(len(data), crc, created)
        admitted, doomed = self.state.admit(key, entry, fetch, reads, data)
        await self._delete(doomed)
        return entry.item(key) if admitted else None

    async def idle(self) -> None:
        """Return once the index calls started in the background (commits, abandons) end."""
        while self._background:
            await asyncio.wait([asyncio.wrap_future(f) for f in list(self._background)])

    def _in_background(self, coro: Any) -> None:
        """Run an index call on the worker's loop without making the reader wait for it."""
        future = self.worker_loop.spawn(coro)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _delete(self, keys: Iterable[str]) -> None:
        doomed = list(keys)

        def delete() -> None:
            for key in doomed:
                self.disk.delete(key)

        if doomed:
            await asyncio.to_thread(delete)

    # -- index calls (worker loop) -------------------------------------------------------
    async def _commit(self, item: Item) -> None:
        try:
            reply = await self.index.commit_one(item)
        except UNAVAILABLE as err:
            logger.debug("zarr cache commit of %s failed: %s", item.key, err)
            return
        for key in reply.rejected:  # the claim was lost (index rebuilt, taken over)
            await self._delete(self.state.remove_copy(key, item.tag))

    async def _abandon(self, key: str) -> None:
        try:
            await self.index.abandon([key])
        except UNAVAILABLE as err:
            logger.debug("zarr cache abandon of %s failed: %s", key, err)

    async def _register(self, index: IndexClient, shard: int) -> None:
        """Tell a newly found index shard which files on this worker's disk are its keys."""
        await self._delete(self.state.remove(await index.register(shard, self.state.items())))

    # -- the write history (worker loop) ---------------------------------------------------
    async def sync(self) -> None:
        """Catch up with the scheduler's write history, and renew this worker's lease.

        The first call also decides which files found on disk at start may be served
        (see :func:`~dask_zarr_cache.writes.catch_up.catch_up`).
        """
        await self._delete(
            await catch_up(self.scheduler, self.address, self.state, self.timeout, self.clock)
        )

    # -- handlers for peers and the scheduler (worker loop) --------------------------------
    @property
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Worker handlers by name: each the method of the same name."""
        return {
            "zarr_cache_get": self.zarr_cache_get,
            "zarr_cache_apply_write": self.zarr_cache_apply_write,
            "zarr_cache_apply_evict": self.zarr_cache_apply_evict,
            "zarr_cache_apply_prove": self.zarr_cache_apply_prove,
            "zarr_cache_counters": self.zarr_cache_counters,
            "zarr_cache_index_moved": self.zarr_cache_index_moved,
            "zarr_cache_worker_left": self.zarr_cache_worker_left,
        }

    async def zarr_cache_get(self, key: str, probe: bool = False) -> dict[str, Any]:
        """A peer asks for the bytes of ``key`` (see :meth:`Peers.serve`)."""
        return await self.peers.serve(key, probe)

    async def zarr_cache_apply_write(
        self, epoch: bytes, seq: int, keys: bytes, prefixes: bytes
    ) -> int:
        """Apply write ``seq`` of ``epoch``'s history: drop matching files, poison fetches.

        Returns the highest write sequence this worker has applied without a gap.
        """
        await self._delete(self.state.apply_write(epoch, seq, unpack(keys), unpack(prefixes)))
        return self.state.applied_seq

    async def zarr_cache_apply_evict(
        self, epoch: bytes, seq: int, keys: bytes, prefixes: bytes
    ) -> bytes:
        """Apply eviction ``seq`` of ``epoch``'s history: as a write, then tell the index.

        Returns an :class:`~dask_zarr_cache.core.protocol.EvictReply` (packed): the
        highest write applied without a gap, and the objects and bytes dropped here.
        """
        doomed, objects, nbytes = self.state.evict(epoch, seq, unpack(keys), unpack(prefixes))
        await self._delete(doomed)
        await self.upkeep.report()  # so the index stops sending readers here
        return pack(EvictReply(self.state.applied_seq, objects, nbytes))

    async def zarr_cache_apply_prove(self, prefix: str, store: bytes) -> bytes:
        """Check this worker's earlier cluster's files below ``prefix`` (:class:`EarlierFiles`)."""
        return await self.earlier_files.apply_prove(prefix, store)

    async def settle(self, prefix: str, source: Any, dataset: Any) -> None:
        """Before this worker's first read below ``prefix``: see :meth:`EarlierFiles.settle`."""
        await self.earlier_files.settle(prefix, source, dataset)

    async def drop_written(self, keys: list[str], prefixes: list[str]) -> None:
        """Drop what this worker's own write replaced, before the write has a number.

        For a write whose announcement cannot go through this worker's loop (see
        :mod:`~dask_zarr_cache.writes.announce`); :meth:`written` gives it its number after.
        """
        await self.kept_writes.drop(keys, prefixes)

    def written(self, keys: list[str], prefixes: list[str], seq: int) -> None:
        """Number this worker's own write, dropped by :meth:`drop_written`, ``seq``."""
        self.kept_writes.numbered(keys, prefixes, seq)

    @property
    def keeps_writes(self) -> bool:
        """Whether this cache keeps what tasks on its worker write (``cache_writes``)."""
        return self.settings.cache_writes

    def position(self) -> tuple[bytes | None, int]:
        """Whose write history this worker follows, and up to which write it applied it."""
        return self.state.position()

    def keep_written(
        self, key: str, data: bytes, reply: WriteReply, since: tuple[bytes | None, int]
    ) -> None:
        """Keep the bytes a task on this worker wrote to ``key`` (see :class:`KeptWrites`)."""
        self.kept_writes.keep(key, data, reply, since)

    async def zarr_cache_index_moved(self, shard: int | None = None) -> None:
        """A new index shard (or layout) exists: register this worker's files right away."""
        self.index.moved(shard)
        await self.flush()

    async def zarr_cache_worker_left(self, address: str) -> None:
        """A peer left the cluster: stop asking it, and fail the calls waiting on it now."""
        logger.debug("zarr cache: %s left the cluster", address)
        self.state.peer_left(address)
        self.index.host_left(address)
        self.peers.host_left(address)

    async def zarr_cache_counters(self) -> dict[str, int]:
        """Return the counters of this worker."""
        return self.state.counts()

    # -- periodic upkeep (worker loop) -----------------------------------------------------
    async def flush(self) -> None:
        """Catch up on writes, expire old files, report to the index (see :class:`Upkeep`)."""
        await self.upkeep.flush()
