"""How workers and the scheduler reach the index actor: one typed method per operation.

The scheduler knows where the index actor lives (``zarr_cache_index`` handler); callers
ask it once, then call the actor's methods directly on its host worker with the
``actor_execute`` handler, the same call a ``distributed.Actor`` handle makes.  When a
call fails the location is forgotten and asked again, which is how callers find an index
that was re-created elsewhere.  Every index call goes through :meth:`IndexClient._call`,
the one place where sharding by key hash would go.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.protocol.serialize import Serialized, deserialize

from dask_zarr_cache._exceptions import ZarrCacheError
from dask_zarr_cache._protocol import (
    FETCH,
    CommitReply,
    Decision,
    Item,
    TouchReply,
    pack,
    unpack,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

__all__ = ["IndexClient", "IndexUnavailableError"]


class IndexUnavailableError(ZarrCacheError):
    """The index actor does not exist yet, was lost, or did not answer."""


class IndexClient:
    """Calls the cluster's index actor, on behalf of one worker (or of the scheduler).

    Parameters
    ----------
    worker : str
        Address of the worker calling (``""`` for the scheduler).
    scheduler : rpc
        An rpc to the scheduler (``worker.scheduler``), or ``None`` when ``locate`` is
        given.
    rpc : callable
        Connection pool: ``rpc(address)`` returns an rpc to a worker.
    on_connect : callable, optional
        Coroutine function ``on_connect(client)`` run once per newly found index, before
        any other call reaches it (a worker registers its files there).
    locate : callable, optional
        Coroutine function returning ``{"address", "key"}`` or ``None``; defaults to
        asking the scheduler.

    """

    def __init__(
        self,
        worker: str,
        scheduler: Any,
        rpc: Callable[[str], Any],
        on_connect: Callable[[IndexClient], Awaitable[None]] | None = None,
        locate: Callable[[], Awaitable[dict[str, str] | None]] | None = None,
    ) -> None:
        self.worker = worker
        self._scheduler = scheduler
        self._rpc = rpc
        self._on_connect = on_connect
        self._locate = locate or self._ask_scheduler
        self._location: dict[str, str] | None = None
        self._lock: asyncio.Lock | None = None
        self._connecting: dict[str, str] | None = None
        self._batches: dict[str, list[tuple[str, asyncio.Future[Decision]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self.timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))

    @property
    def connected(self) -> bool:
        """Whether an index location is known (and, for workers, registered with)."""
        return self._location is not None

    @property
    def location(self) -> dict[str, str] | None:
        """``{"address", "key"}`` of the index actor in use, if any."""
        return self._location

    def reset(self) -> None:
        """Forget the index location; the next call looks it up (and registers) again."""
        self._location = None

    # -- operations ----------------------------------------------------------------------
    async def acquire(self, keys: Iterable[str], unreachable: str = "") -> list[Decision]:
        """Decide how this worker gets each of ``keys`` (see ``CacheIndex.acquire``)."""
        reply = await self._call("acquire", self.worker, pack(list(keys)), unreachable)
        return [Decision(*d) for d in unpack(reply)]

    async def acquire_one(self, key: str, unreachable: str = "") -> Decision:
        """Decide for one key; the calls made in one loop iteration share one round trip.

        zarr reads the chunks of a selection concurrently, so their misses arrive together
        and cost one index call, not one each.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        batch = self._batches.setdefault(unreachable, [])
        batch.append((key, future))
        if len(batch) == 1:
            loop.call_soon(self._send_soon, unreachable)
        return await future

    def _send_soon(self, unreachable: str) -> None:
        task = asyncio.ensure_future(self._send_batch(self._batches.pop(unreachable), unreachable))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_batch(
        self, batch: list[tuple[str, asyncio.Future[Decision]]], unreachable: str
    ) -> None:
        try:
            decisions = await self.acquire([key for key, _ in batch], unreachable)
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        orphans = []  # claims of callers that were cancelled meanwhile: give them back
        for (key, future), decision in zip(batch, decisions, strict=True):
            if not future.done():
                future.set_result(decision)
            elif decision.kind == FETCH:
                orphans.append(key)
        if orphans:
            with contextlib.suppress(IndexUnavailableError):
                await self.abandon(orphans)

    async def commit(self, capacity: int, items: Iterable[Item]) -> CommitReply:
        """Record objects this worker now holds (see ``CacheIndex.commit``)."""
        reply = await self._call("commit", self.worker, capacity, pack(list(items)))
        return CommitReply(*unpack(reply))

    async def abandon(self, keys: Iterable[str]) -> None:
        """Give up this worker's pending claims of ``keys``."""
        await self._call("abandon", self.worker, pack(list(keys)))

    async def touch(self, accessed: Iterable[str], dropped: Iterable[Item]) -> TouchReply:
        """Report batched accesses and copies this worker deleted (see ``CacheIndex.touch``)."""
        reply = await self._call("touch", self.worker, pack(list(accessed)), pack(list(dropped)))
        return TouchReply(*unpack(reply))

    async def register(self, capacity: int, files: Iterable[Item]) -> list[str]:
        """Tell the index this worker's budget and files; returns keys to delete."""
        return unpack(await self._call("register", self.worker, capacity, pack(list(files))))

    async def invalidate(self, keys: Iterable[str], prefixes: Iterable[str]) -> int:
        """Forget written keys (with their ranges) and every key under ``prefixes``."""
        return await self._call("invalidate", pack(list(keys)), pack(list(prefixes)))

    async def remove_worker(self, worker: str) -> int:
        """Forget a departed worker's entries and claims."""
        return await self._call("remove_worker", worker)

    async def configure(self, max_age_seconds: float | None, policy: str) -> None:
        """Apply a new TTL and replacement policy."""
        await self._call("configure", max_age_seconds, policy)

    async def cached(self, keys: list[str]) -> list[bool]:
        """Whether each key is cached on some worker."""
        return unpack(await self._call("cached", pack(keys)))

    async def summary(self) -> dict[str, Any]:
        """Entries, pending fetches and per-worker budgets."""
        return await self._call("summary")

    # -- plumbing --------------------------------------------------------------------------
    async def _call(self, function: str, *args: Any) -> Any:
        """Call ``IndexActor.<function>(*args)`` and return its result.

        Raises
        ------
        IndexUnavailableError
            If there is no index, it was lost, or it did not answer within the timeout.

        """
        if self._connecting is not None:  # calls of on_connect reach the new index
            return await self._execute(self._connecting, function, args)
        location = await self._ensure_location()
        try:
            return await self._execute(location, function, args)
        except IndexUnavailableError:
            if self._location is location:
                self._location = None
            raise

    async def _ensure_location(self) -> dict[str, str]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        location = self._location
        if location is not None:
            return location
        async with self._lock:
            if self._location is None:
                try:
                    location = await asyncio.wait_for(self._locate(), self.timeout)
                except (TimeoutError, OSError) as err:
                    raise IndexUnavailableError(f"scheduler did not answer: {err}") from err
                if not location:
                    raise IndexUnavailableError("the zarr cache index does not exist (yet)")
                if self._on_connect is not None:
                    self._connecting = location
                    try:
                        await self._on_connect(self)
                    finally:
                        self._connecting = None
                self._location = location
            return self._location

    async def _ask_scheduler(self) -> dict[str, str] | None:
        return await self._scheduler.zarr_cache_index()

    async def _execute(self, location: dict[str, str], function: str, args: tuple) -> Any:
        try:
            reply = await asyncio.wait_for(
                self._rpc(location["address"]).actor_execute(
                    actor=location["key"], function=function, args=list(args), kwargs={}
                ),
                self.timeout,
            )
        except (TimeoutError, OSError, KeyError) as err:
            raise IndexUnavailableError(f"index at {location['address']}: {err!r}") from err
        if reply.get("status") != "OK":
            raise IndexUnavailableError(f"index call {function} failed: {reply.get('exception')!r}")
        result = reply["result"]
        if isinstance(result, Serialized):  # the scheduler's rpc does not deserialize
            result = deserialize(result.header, result.frames)
        return result
