"""Where the index shards live: creating them on workers, moving them, re-creating lost ones.

Each shard is hosted by a worker's :class:`~dask_zarr_cache.index.host.IndexHost`,
created with the handler ``zarr_cache_index_create`` on the running worker hosting the
fewest shards, so shards spread over workers.  Creating one is a message, not a task: it
never waits for a free task thread on its worker (a Dask Actor's constructor would, behind
whatever tasks occupy the threads, often the very reads that need the index).  A shard
whose worker leaves is created again, empty, on another worker, and the workers register
their files of that shard there; the other shards carry on untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.index.client import IndexClient

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

    from distributed import Scheduler

    from dask_zarr_cache.core.config import CacheSettings

__all__ = ["IndexShards"]

logger = logging.getLogger(__name__)


class IndexShards:
    """The index shards of one scheduler, and the scheduler's client of them.

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler.
    settings : CacheSettings
        TTL, policy and shard count (the owner replaces :attr:`settings` on changes).
    hosts : callable
        The workers that may host a shard (they have the cache's handlers installed).
    on_created : callable
        Coroutine function ``on_created(shard)`` run after a shard was created (``None``:
        after every shard was dropped for a new shard count).

    """

    def __init__(
        self,
        scheduler: Scheduler,
        settings: CacheSettings,
        hosts: Callable[[], Collection[str]],
        on_created: Callable[[int | None], Awaitable[None]],
    ) -> None:
        self.scheduler = scheduler
        self.settings = settings
        #: Address and key (the shard's name on its host) of each shard (``None``: none yet).
        self.locations: list[dict[str, str] | None] = [None] * settings.index_shards
        self.client = IndexClient("", None, scheduler.rpc, locate=self.locate)
        self._hosts = hosts
        self._on_created = on_created
        self._creating: dict[int, asyncio.Task[None]] = {}
        self._hosts_chosen: dict[int, str] = {}
        self._dropping: set[asyncio.Task[None]] = set()
        #: While set, :meth:`ensure` creates nothing (the workers are being set up).
        self.paused = False

    async def locate(self) -> list[dict[str, str] | None]:
        """Where each shard is (``None`` while it has none).

        Never waits for a shard to be created: callers read from the source meanwhile and
        ask again later.
        """
        self.ensure()
        return list(self.locations)

    def ensure(self) -> asyncio.Future[Any]:
        """Start creating every missing shard unless it is being created already."""
        for shard, location in enumerate([] if self.paused else self.locations):
            creating = self._creating.get(shard)
            if location is None and (creating is None or creating.done()):
                self._creating[shard] = asyncio.ensure_future(self._create(shard))
        pending = [t for t in self._creating.values() if not t.done()]
        if pending:
            return asyncio.gather(*pending)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def on(self, worker: str) -> list[int]:
        """The shards ``worker`` hosts."""
        hosts = [location and location["address"] for location in self.locations]
        return [shard for shard, host in enumerate(hosts) if host == worker]

    def lost(self, worker: str) -> list[int]:
        """``worker`` left: re-create the shards it hosted elsewhere; returns them."""
        return self._move_off(worker, drop=False, why="left")

    def retiring(self, worker: str) -> None:
        """Move the shards off a worker that is being retired (before it closes)."""
        self._move_off(worker, drop=True, why="is retiring")

    def _move_off(self, worker: str, drop: bool, why: str) -> list[int]:
        shards = self.on(worker)
        for shard in shards:
            logger.info("zarr cache index shard %d: host %s %s; moving it", shard, worker, why)
            self._forget(shard, drop)
        if shards:
            self.ensure()
        return shards

    async def reshard(self, shards: int) -> None:
        """Start over with ``shards`` empty shards (the shard count setting changed)."""
        for shard in range(len(self.locations)):
            self._forget(shard, drop=True)
        for task in self._creating.values():
            task.cancel()
        self._creating, self._hosts_chosen = {}, {}
        self.locations = [None] * shards
        self.client.reset()
        self.ensure()
        await self._on_created(None)

    async def close(self) -> None:
        """Stop creating shards."""
        for task in self._creating.values():
            task.cancel()

    # -- internals -------------------------------------------------------------------------
    async def _create(self, shard: int) -> None:
        try:
            await self._create_on_a_worker(shard)
        except Exception as err:  # retried on the next worker arrival or lookup
            if self.scheduler.status.name not in ("closing", "closed"):
                logger.warning("could not create zarr cache index shard %d: %r", shard, err)

    async def _create_on_a_worker(self, shard: int) -> None:
        host = self._choose_host()
        if host is None:
            return
        self._hosts_chosen[shard] = host  # before any wait: shards created together spread
        key = f"zarr-cache-index-{shard}-{uuid.uuid4().hex[:12]}"
        await asyncio.wait_for(
            self.scheduler.rpc(host).zarr_cache_index_create(
                shard=key,
                max_age_seconds=self.settings.max_age_seconds,
                policy=self.settings.policy,
                pending_timeout=self.settings.pending_timeout,
            ),
            self.client.timeout,
        )
        if shard >= len(self.locations) or host not in self._hosts():  # changed meanwhile
            return
        self.locations[shard] = {"address": host, "key": key}
        logger.info("zarr cache index shard %d created on %s", shard, host)
        await self._on_created(shard)

    def _choose_host(self) -> str | None:
        """The running worker with the cache hosting the fewest shards."""
        candidates = set(self._hosts())
        workers = [
            ws.address
            for ws in self.scheduler.workers.values()
            if ws.status.name in ("running", "paused") and ws.address in candidates
        ]
        if not workers:
            return None
        hosting = [loc["address"] for loc in self.locations if loc is not None]
        hosting += [h for s, h in self._hosts_chosen.items() if self.locations[s] is None]
        return min(workers, key=lambda w: (hosting.count(w), w))

    def _forget(self, shard: int, drop: bool) -> None:
        """Drop a shard's location; ``drop`` it on its host too (else the host is gone)."""
        location = self.locations[shard]
        if drop and location is not None:
            task = asyncio.ensure_future(self._drop(location))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)
        self.locations[shard] = None
        self.client.reset(shard)

    async def _drop(self, location: dict[str, str]) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(
                self.scheduler.rpc(location["address"]).zarr_cache_index_drop(
                    shard=location["key"]
                ),
                self.client.timeout,
            )
