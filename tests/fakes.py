"""Fakes for unit tests of the worker cache: a clock, a scheduler and an rpc pool.

The index behind the fake rpc is the real :class:`~dask_zarr_cache._index.IndexActor`, and
the write history the real :class:`~dask_zarr_cache._invalidation.InvalidationLog`; only
the network between them is replaced by direct calls.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dask_zarr_cache._config import CacheSettings
from dask_zarr_cache._index_actor import IndexActor
from dask_zarr_cache._index_client import IndexClient
from dask_zarr_cache._invalidation import InvalidationLog
from dask_zarr_cache._protocol import SyncReply, pack, unpack
from dask_zarr_cache._worker import WorkerCache

INDEX = "tcp://index:1"  # shard 0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def shard_address(shard: int) -> str:
    return f"tcp://index:{shard + 1}"


class FakeScheduler:
    """The scheduler's ``zarr_cache_index`` and ``zarr_cache_sync`` handlers."""

    def __init__(self, shards: int = 1) -> None:
        self.log = InvalidationLog()
        self.reachable = True
        self.shards = shards

    async def zarr_cache_index(self) -> list[dict[str, str]]:
        return [{"address": shard_address(s), "key": f"index-{s}"} for s in range(self.shards)]

    async def zarr_cache_sync(self, worker: str, epoch: bytes | None, seq: int) -> bytes:
        if not self.reachable:
            raise OSError("scheduler unreachable")
        if epoch == self.log.epoch:
            history = self.log.since(seq)
            inv = None if history is None else [e.as_message() for e in history]
        else:
            inv = [] if epoch is None and seq == 0 else None
        return pack(SyncReply(self.log.epoch, self.log.seq, inv))


class _Endpoint:
    def __init__(self, pool: FakeNetwork, address: str) -> None:
        self.pool, self.address = pool, address

    async def actor_execute(self, actor, function, args, kwargs):
        self.pool.calls.append((self.address, function))
        if self.address in self.pool.hung:  # a dead worker: connecting waits out the timeout
            await asyncio.Event().wait()
        if function == "exchange":  # (keys asked, objects committed) per message
            self.pool.exchanges.append((len(unpack(args[1])), len(unpack(args[3]))))
        if self.address in self.pool.down:
            raise OSError(f"{self.address} is down")
        index = self.pool.indexes[int(actor.rsplit("-", 1)[1])]
        result = await getattr(index, function)(*args, **kwargs)
        return {"status": "OK", "result": result}

    async def zarr_cache_get(self, key: str) -> dict[str, Any]:
        self.pool.calls.append((self.address, "get"))
        if self.address in self.pool.down:
            raise OSError(f"{self.address} is down")
        reply = await self.pool.caches[self.address].handle_get(key)
        if "data" in reply:  # what the receiving end of a real comm gets
            reply = {**reply, "data": reply["data"].data}
        return reply


class FakeNetwork:
    """``rpc(address)`` for every worker: the index actor and peers' handlers, in-process."""

    def __init__(self, max_age_seconds: float | None = None, shards: int = 1) -> None:
        self.indexes = [IndexActor(max_age_seconds) for _ in range(shards)]
        self.index = self.indexes[0]
        self.scheduler = FakeScheduler(shards)
        self.caches: dict[str, WorkerCache] = {}
        self.calls: list[tuple[str, str]] = []
        self.exchanges: list[tuple[int, int]] = []
        self.down: set[str] = set()
        self.hung: set[str] = set()

    def __call__(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

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

    async def write(self, keys=(), prefixes=()) -> None:
        """What the scheduler does for a write: history, index, then every worker."""
        entry = self.scheduler.log.append(list(keys), list(prefixes))
        await IndexClient("", self.scheduler, self).invalidate(keys)
        for address, cache in self.caches.items():
            if address not in self.down:
                await cache.handle_invalidate(entry.seq, pack(list(keys)), pack(list(prefixes)))

    def index_calls(self, function: str) -> int:
        return sum(1 for addr, f in self.calls if addr.startswith("tcp://index:") and f == function)


class Source:
    """A source store's read: counts reads, can block until released, can fail."""

    def __init__(self, data: bytes | None = b"bytes") -> None:
        self.data = data
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None

    async def __call__(self) -> bytes | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.data
