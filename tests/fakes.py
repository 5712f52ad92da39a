"""Fakes for unit tests of the worker cache: a clock, a scheduler and an rpc pool.

The index behind the fake rpc is the real :class:`~dask_zarr_cache.index.host.IndexHost`
(one per shard, hosting a real :class:`~dask_zarr_cache.index.shard.CacheIndex`), and the write
history the real :class:`~dask_zarr_cache.writes.log.InvalidationLog`; only the network
between them is replaced by direct calls.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dask_zarr_cache.core.config import CacheSettings
from dask_zarr_cache.core.protocol import EvictReply, SyncReply, pack, unpack
from dask_zarr_cache.index.client import IndexClient
from dask_zarr_cache.index.host import IndexHost
from dask_zarr_cache.index.shard import CacheIndex
from dask_zarr_cache.worker.cache import WorkerCache
from dask_zarr_cache.writes.log import InvalidationLog

INDEX = "tcp://index:1"  # shard 0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def shard_address(shard: int) -> str:
    return f"tcp://index:{shard + 1}"


class FakeScheduler:
    """The scheduler's ``zarr_cache_index``, ``_sync`` and ``_prove`` handlers."""

    def __init__(self, shards: int = 1) -> None:
        self.log = InvalidationLog()
        self.reachable = True
        self.shards = shards

    async def zarr_cache_index(self) -> list[dict[str, str]]:
        return [{"address": shard_address(s), "key": f"index-{s}"} for s in range(self.shards)]

    async def zarr_cache_prove(self, prefix: str, store: bytes, dataset: bytes) -> dict[str, int]:
        """Nobody holds files of an earlier cluster here (see the worker's own handler)."""
        return {"current": 0, "stale": 0}

    async def zarr_cache_sync(
        self, worker: str, epoch: bytes | None, seq: int, found_files: bool = False
    ) -> bytes:
        if not self.reachable:
            raise OSError("scheduler unreachable")
        invalidations, _applied = self.log.catch_up(epoch, seq)
        return pack(SyncReply(self.log.epoch, self.log.seq, invalidations))


class _Endpoint:
    def __init__(self, pool: FakeNetwork, address: str) -> None:
        self.pool, self.address = pool, address

    def __getattr__(self, handler: str):
        """An index handler of the shard host at this address (``rpc(address).<handler>``)."""
        host = self.pool.hosts.get(self.address)
        if host is None or handler not in host.handlers:
            raise AttributeError(handler)
        method = host.handlers[handler]

        async def call(**kwargs):
            self.pool.calls.append((self.address, handler.removeprefix("zarr_cache_index_")))
            if self.address in self.pool.hung:  # a dead worker: connecting waits out the timeout
                await self.pool.hang()
            if handler == "zarr_cache_index_exchange":  # (keys asked, objects committed)
                self.pool.exchanges.append(
                    (len(unpack(kwargs["digests"])), len(unpack(kwargs["commits"])))
                )
            if self.address in self.pool.down:
                raise OSError(f"{self.address} is down")
            return await method(**kwargs)

        return call

    async def zarr_cache_get(self, key: str, probe: bool = False) -> dict[str, Any] | None:
        self.pool.calls.append((self.address, "get"))
        if self.address in self.pool.hung:  # frozen, or dead with a connect still retried
            await self.pool.hang()
        if self.address in self.pool.down:
            raise OSError(f"{self.address} is down")
        if self.address in self.pool.handlerless:  # restarted, its plugin not set up yet
            return None
        reply = await self.pool.caches[self.address].zarr_cache_get(key, probe)
        if "data" in reply:  # what the receiving end of a real comm gets
            reply = {**reply, "data": reply["data"].data}
        return reply


class FakeNetwork:
    """``rpc(address)`` for every worker: the index actor and peers' handlers, in-process."""

    def __init__(self, max_age_seconds: float | None = None, shards: int = 1) -> None:
        self.hosts = {shard_address(s): IndexHost() for s in range(shards)}
        for s in range(shards):
            self.recreate(s, max_age_seconds)
        self.scheduler = FakeScheduler(shards)
        self.caches: dict[str, WorkerCache] = {}
        self.calls: list[tuple[str, str]] = []
        self.exchanges: list[tuple[int, int]] = []
        self.down: set[str] = set()
        self.hung: set[str] = set()
        self.handlerless: set[str] = set()
        self._stuck = 0  # calls hanging on a hung address
        self._stuck_changed = asyncio.Condition()

    def __call__(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

    @property
    def indexes(self) -> list[CacheIndex]:
        """Each shard's index."""
        return [h.shards[f"index-{s}"] for s, h in enumerate(self.hosts.values())]

    @property
    def index(self) -> CacheIndex:
        """Shard 0's index."""
        return self.indexes[0]

    def recreate(self, shard: int, max_age_seconds: float | None = None) -> None:
        """The scheduler made ``shard`` again (empty), at the same address."""
        index = CacheIndex(max_age_seconds)
        self.hosts[shard_address(shard)].shards[f"index-{shard}"] = index

    async def hang(self) -> None:
        """A call to a hung address: never returns (until cancelled)."""
        async with self._stuck_changed:
            self._stuck += 1
            self._stuck_changed.notify_all()
        await asyncio.Event().wait()

    async def stuck(self, calls: int = 1) -> None:
        """Wait until ``calls`` calls in all hang on hung addresses (instead of sleeping)."""
        async with self._stuck_changed:
            await self._stuck_changed.wait_for(lambda: self._stuck >= calls)

    async def idle(self) -> None:
        """Wait for every worker's background index calls (instead of sleeping)."""
        for cache in list(self.caches.values()):
            await cache.idle()

    async def worker(self, address, directory, clock, **settings) -> WorkerCache:
        cache = WorkerCache(
            address,
            self.scheduler,
            self,
            asyncio.get_running_loop(),
            CacheSettings(**{"max_size": 10_000, **settings}),
            str(directory),
            timeout=1.0,
            clock=clock,
        )
        await cache.start()
        self.caches[address] = cache
        return cache

    async def write(self, keys=(), prefixes=(), late=()) -> int:
        """What the scheduler does for a write: history, index, then every worker.

        Workers in ``late`` are not told yet (their push is slow): :meth:`push` them later.
        Returns the write's number.
        """
        entry = self.scheduler.log.append(list(keys), list(prefixes))
        await IndexClient("", self.scheduler, self).invalidate(keys)
        for address in self.caches:
            if address not in self.down and address not in late:
                await self.push(address, entry.seq)
        return entry.seq

    async def evict(self, keys=(), prefixes=()) -> dict[str, EvictReply]:
        """What the scheduler does for an eviction: history, then every worker; replies."""
        entry = self.scheduler.log.append(list(keys), list(prefixes))
        message = {"keys": pack(list(keys)), "prefixes": pack(list(prefixes))}
        return {
            address: unpack(
                await cache.zarr_cache_apply_evict(self.scheduler.log.epoch, entry.seq, **message)
            )
            for address, cache in self.caches.items()
            if address not in self.down
        }

    async def push(self, address: str, seq: int) -> None:
        """Deliver write ``seq`` to worker ``address``."""
        (entry,) = [e for e in self.scheduler.log.since(seq - 1) if e.seq == seq]
        await self.caches[address].zarr_cache_apply_write(
            self.scheduler.log.epoch, seq, pack(list(entry.keys)), pack(list(entry.prefixes))
        )

    def index_calls(self, function: str) -> int:
        return sum(1 for addr, f in self.calls if addr.startswith("tcp://index:") and f == function)


class Source:
    """A source store's read: counts reads, can block until released, can fail."""

    def __init__(self, data: bytes | None = b"bytes") -> None:
        self.data = data
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None
        #: Set once a read reached the source (and waits at :attr:`gate`, if any).
        self.reached = asyncio.Event()

    async def __call__(self) -> bytes | None:
        self.reads += 1
        self.reached.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.data
