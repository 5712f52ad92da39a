"""Announcing a write to every cluster reachable from the writing code.

A write through ``ClusterCacheStore`` is announced to the scheduler (handler
``zarr_cache_write``), which returns once no worker can serve the replaced bytes.
Announcements from one event loop to one scheduler are *group-committed*
(:class:`~dask_zarr_cache.writes.group_commit.GroupCommit`): at most one is in flight, and
the writes that finish meanwhile go together in the next one, so the many chunk writes of
one ``arr[...] = x`` cost a few round trips, not one each, and a lone write waits for
nobody.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from dataclasses import dataclass
from typing import Any

from distributed import Worker, default_client
from distributed.core import rpc

from dask_zarr_cache.core.lookup import cache_of, current_worker, process_workers
from dask_zarr_cache.core.loops import LoopBlockedError, event_loop_of, run_on
from dask_zarr_cache.core.protocol import WriteReply, pack, unpack
from dask_zarr_cache.writes.group_commit import GroupCommit

__all__ = ["announce_write"]


async def announce_write(
    keys: list[str], prefixes: list[str]
) -> list[tuple[Worker | None, WriteReply]]:
    """Announce a write of cache ``keys`` and key ``prefixes`` to every reachable cluster.

    Without a reachable cluster (no client, not in a worker) this is a write behind the
    cache's back: workers see it after ``max_age_seconds``.  Returns, per cluster, the
    worker this code runs on (``None``: a client) and the scheduler's reply (the
    write's place in that cluster's history).
    """
    return [(cluster.worker, await cluster.announce(keys, prefixes)) for cluster in _clusters()]


async def _numbered(scheduler: Any, keys: list[str], prefixes: list[str]) -> WriteReply:
    """One batch of writes announced to ``scheduler``; the scheduler's reply."""
    return unpack(await scheduler.zarr_cache_write(keys=pack(keys), prefixes=pack(prefixes)))


#: Announcements from one loop to one scheduler (by loop id and address), and that rpc.
_commits: dict[tuple[int, str], tuple[Any, GroupCommit[WriteReply]]] = {}
_commits_lock = threading.Lock()


async def _group_announce(scheduler: Any, keys: list[str], prefixes: list[str]) -> WriteReply:
    """Runs on the loop that owns ``scheduler`` (an rpc of that loop)."""
    key = (id(asyncio.get_running_loop()), scheduler.address)
    with _commits_lock:
        rpc_of, commit = _commits.get(key, (None, None))
        if commit is None or rpc_of is not scheduler:
            commit = GroupCommit(functools.partial(_numbered, scheduler))
            _commits[key] = (scheduler, commit)
    return await commit.submit(keys, prefixes)


@dataclass(frozen=True)
class _Cluster:
    """How this code reaches one cluster's scheduler: through a worker's or a client's loop."""

    loop: asyncio.AbstractEventLoop
    scheduler: Any
    worker: Worker | None = None

    async def announce(self, keys: list[str], prefixes: list[str]) -> WriteReply:
        """Tell the scheduler about a write; returns once no worker serves the old bytes.

        Returns the scheduler's reply: the write's place in the cluster's history.
        """
        try:
            return await run_on(self.loop, _group_announce(self.scheduler, keys, prefixes))
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
            reply: WriteReply = unpack(
                await scheduler.zarr_cache_write(
                    keys=pack(keys), prefixes=pack(prefixes), origin=origin
                )
            )
        if cache is not None:
            cache.written(keys, prefixes, reply.seq)
        return reply


def _clusters() -> list[_Cluster]:
    """Every cluster reachable from this code, once each (see :mod:`~dask_zarr_cache.core.lookup`).

    A task's worker, else this process's client, else the workers in this process (a
    thread started by a task has no task context).
    """
    worker = current_worker()
    if worker is not None:
        return [_Cluster(event_loop_of(worker), worker.scheduler, worker)]
    try:
        client = default_client()
    except ValueError:
        pass
    else:
        return [_Cluster(event_loop_of(client), client.scheduler)]
    found: dict[str, _Cluster] = {}
    for worker in process_workers():
        found.setdefault(
            worker.scheduler.address, _Cluster(event_loop_of(worker), worker.scheduler, worker)
        )
    return list(found.values())
