"""Where the index shards live: creating their actors, moving them, re-creating lost ones.

Each shard is a Dask Actor (:class:`~dask_zarr_cache._index_actor.IndexActor`) created by
an internal client of the scheduler on the running worker hosting the fewest shards, so
shards spread over workers.  A shard whose worker leaves is created again, empty, on
another worker, and the workers register their files of that shard there; the other
shards carry on untouched.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from dask_zarr_cache._index_actor import IndexActor
from dask_zarr_cache._index_client import IndexClient

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from distributed import Client, Scheduler

    from dask_zarr_cache._config import CacheSettings

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
    on_created : callable
        Coroutine function ``on_created(shard)`` run after a shard was created (``None``:
        after every shard was dropped for a new shard count).

    """

    def __init__(
        self,
        scheduler: Scheduler,
        settings: CacheSettings,
        on_created: Callable[[int | None], Awaitable[None]],
    ) -> None:
        self.scheduler = scheduler
        self.settings = settings
        #: Address and key of each shard's actor (``None``: being created).
        self.locations: list[dict[str, str] | None] = [None] * settings.index_shards
        self.client = IndexClient("", None, scheduler.rpc, locate=self.locate)
        self._on_created = on_created
        self._client: Client | None = None
        self._futures: dict[int, Any] = {}  # keep the actors' tasks alive
        self._creating: dict[int, asyncio.Task[None]] = {}
        self._hosts_chosen: dict[int, str] = {}

    async def locate(self) -> list[dict[str, str] | None]:
        """Handler ``zarr_cache_index``: each shard's actor (``None`` while it has none).

        Never waits for a shard to be created: creating an actor needs a free worker
        thread, and the callers are often the very reads occupying those threads.  They
        read from the source meanwhile and ask again later.
        """
        self.ensure()
        return list(self.locations)

    def ensure(self) -> asyncio.Future[Any]:
        """Start creating every missing shard unless it is being created already."""
        for shard, location in enumerate(self.locations):
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
        return self._move_off(worker, release=False, why="left")

    def retiring(self, worker: str) -> None:
        """Move the shards off a worker that is being retired.

        ``retire_workers`` refuses to retire a worker holding an actor.  Called from the
        (synchronous) ``worker-status-change`` event, before that check runs, this
        releases the shards' tasks and starts new shards on other workers.
        """
        self._move_off(worker, release=True, why="is retiring")

    def _move_off(self, worker: str, release: bool, why: str) -> list[int]:
        shards = self.on(worker)
        for shard in shards:
            logger.info("zarr cache index shard %d: host %s %s; moving it", shard, worker, why)
            self._forget(shard, release)
        if shards:
            self.ensure()
        return shards

    async def reshard(self, shards: int) -> None:
        """Start over with ``shards`` empty shards (the shard count setting changed)."""
        for shard in range(len(self.locations)):
            self._forget(shard, release=True)
        for task in self._creating.values():
            task.cancel()
        self._creating, self._hosts_chosen = {}, {}
        self.locations = [None] * shards
        self.client.reset()
        self.ensure()
        await self._on_created(None)

    async def close(self) -> None:
        """Stop creating shards and close the internal client."""
        for task in self._creating.values():
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- internals -------------------------------------------------------------------------
    async def _create(self, shard: int) -> None:
        try:
            await self._create_on_a_worker(shard)
        except Exception as err:  # retried on the next worker arrival or lookup
            if self.scheduler.status.name not in ("closing", "closed"):
                logger.warning("could not create zarr cache index shard %d: %r", shard, err)

    async def _create_on_a_worker(self, shard: int) -> None:
        from distributed import Client

        host = self._choose_host()
        if host is None:
            return
        self._hosts_chosen[shard] = host  # before any wait: shards created together spread
        if self._client is None:
            self._client = await Client(
                self.scheduler.address,
                asynchronous=True,
                set_as_default=False,
                security=self.scheduler.security,
                name="dask-zarr-cache-index",
            )
        key = f"zarr-cache-index-{shard}-{uuid.uuid4().hex[:12]}"
        future = self._client.submit(
            IndexActor,
            self.settings.max_age_seconds,
            self.settings.policy,
            actor=True,
            workers=[host],
            allow_other_workers=False,
            pure=False,
            key=key,
        )
        actor = await future
        if shard >= len(self.locations):  # the shard count changed meanwhile
            return
        self._futures[shard] = future
        self.locations[shard] = {"address": actor._address, "key": key}
        logger.info("zarr cache index shard %d created on %s", shard, actor._address)
        await self._on_created(shard)

    def _choose_host(self) -> str | None:
        """The running worker hosting the fewest shards."""
        workers = [
            ws.address
            for ws in self.scheduler.workers.values()
            if ws.status.name in ("running", "paused")
        ]
        if not workers:
            return None
        hosting = [loc["address"] for loc in self.locations if loc is not None]
        hosting += [h for s, h in self._hosts_chosen.items() if self.locations[s] is None]
        return min(workers, key=lambda w: (hosting.count(w), w))

    def _forget(self, shard: int, release: bool) -> None:
        """Drop a shard's location; ``release`` its actor's task (else it is gone anyway)."""
        location, client = self.locations[shard], self._client
        if release and location is not None and client is not None:
            if client.id in self.scheduler.clients:
                self.scheduler.client_releases_keys(
                    keys=[location["key"]],
                    client=client.id,
                    stimulus_id=f"zarr-cache-move-index-{location['key']}",
                )
        self.locations[shard] = None
        self.client.reset(shard)
        self._futures.pop(shard, None)
