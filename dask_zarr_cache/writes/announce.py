"""Announcing a write to every cluster reachable from the writing code.

A write through ``ClusterCacheStore`` is announced to the scheduler (handler
``zarr_cache_write``), which returns once no worker can serve the replaced bytes.
Announcements from one event loop to one scheduler are *group-committed*: at most one is in
flight, and the writes that finish meanwhile go together in the next one, so the many
chunk writes of one ``arr[...] = x`` cost a few round trips, not one each, and a lone
write waits for nobody.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from distributed import Worker, default_client
from distributed.core import rpc

from dask_zarr_cache.core.lookup import cache_of, current_worker, process_workers
from dask_zarr_cache.core.loops import LoopBlockedError, run_on
from dask_zarr_cache.core.protocol import pack

__all__ = ["announce_write"]


async def announce_write(keys: list[str], prefixes: list[str]) -> None:
    """Announce a write of cache ``keys`` and key ``prefixes`` to every reachable cluster.

    Without a reachable cluster (no client, not in a worker) this is a write behind the
    cache's back: workers see it after ``max_age_seconds``.
    """
    for cluster in _clusters():
        await cluster.announce(keys, prefixes)


@dataclass
class _Batch:
    keys: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class _GroupCommit:
    """Announcements from one loop to one scheduler: one in flight, the rest batched."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.next = _Batch()
        self.sending = False
        self._task: asyncio.Future[None] | None = None

    async def announce(self, keys: list[str], prefixes: list[str]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.next.keys += keys
        self.next.prefixes += prefixes
        self.next.waiters.append(waiter)
        if not self.sending:
            self.sending = True
            self._task = asyncio.ensure_future(self._send_all())
        await waiter

    async def _send_all(self) -> None:
        try:
            while self.next.waiters:
                batch, self.next = self.next, _Batch()
                try:
                    await self.scheduler.zarr_cache_write(
                        keys=pack(batch.keys), prefixes=pack(batch.prefixes)
                    )
                except Exception as err:
                    _settle(batch.waiters, err)
                else:
                    _settle(batch.waiters, None)
        finally:
            self.sending = False


def _settle(waiters: list[asyncio.Future[None]], err: Exception | None) -> None:
    for waiter in waiters:
        if not waiter.done():
            if err is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(err)


_commits: dict[tuple[int, str], _GroupCommit] = {}
_commits_lock = threading.Lock()


async def _group_announce(scheduler: Any, keys: list[str], prefixes: list[str]) -> None:
    """Runs on the loop that owns ``scheduler`` (an rpc of that loop)."""
    key = (id(asyncio.get_running_loop()), scheduler.address)
    with _commits_lock:
        commit = _commits.get(key)
        if commit is None or commit.scheduler is not scheduler:
            commit = _commits[key] = _GroupCommit(scheduler)
    await commit.announce(keys, prefixes)


@dataclass(frozen=True)
class _Cluster:
    """How this code reaches one cluster's scheduler: through a worker's or a client's loop."""

    loop: asyncio.AbstractEventLoop
    scheduler: Any
    worker: Worker | None = None

    async def announce(self, keys: list[str], prefixes: list[str]) -> None:
        """Tell the scheduler about a write; returns once no worker serves the old bytes."""
        try:
            await run_on(self.loop, _group_announce(self.scheduler, keys, prefixes))
            return
        except LoopBlockedError:
            if self.worker is None:
                raise
        # The worker's loop cannot carry this: its thread waits for this very write
        # (zarr's sync API in an ``async def`` task), or this is a process forked from a
        # task. Apply the write to this worker's cache here (if this is its process), and
        # tell the scheduler over a connection of this loop's own.
        cache = cache_of(self.worker)
        if cache is not None:
            await cache.drop_written(keys, prefixes)
        origin = None if cache is None else self.worker.address
        args = self.worker.connection_args
        async with rpc(self.scheduler.address, connection_args=args) as scheduler:
            reply = await scheduler.zarr_cache_write(
                keys=pack(keys), prefixes=pack(prefixes), origin=origin
            )
        if cache is not None:
            cache.written(keys, prefixes, reply["seq"])


def _clusters() -> list[_Cluster]:
    """Every cluster reachable from this code, once each (see :mod:`~dask_zarr_cache.core.lookup`).

    A task's worker, else this process's client, else the workers in this process (a
    thread started by a task has no task context).
    """
    worker = current_worker()
    if worker is not None:
        return [_Cluster(worker.loop.asyncio_loop, worker.scheduler, worker)]
    try:
        client = default_client()
    except ValueError:
        pass
    else:
        return [_Cluster(client.loop.asyncio_loop, client.scheduler)]
    found: dict[str, _Cluster] = {}
    for worker in process_workers():
        found.setdefault(
            worker.scheduler.address, _Cluster(worker.loop.asyncio_loop, worker.scheduler, worker)
        )
    return list(found.values())
