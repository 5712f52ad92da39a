"""The write protocol at the scheduler: number writes, push them, wait until nothing old is served.

:class:`WriteCoordinator` keeps the write history (:class:`InvalidationLog`), what each
worker confirmed, and when each worker last caught up (its lease).  A write is appended
to the history, dropped from the index, pushed to every worker whose lease may still run,
and returns once each of them applied it or its lease ran out.  Writes are
group-committed (:class:`~dask_zarr_cache.writes.group_commit.GroupCommit`): those that
arrive while one batch is applied go together in the next, so a write's cost here is
shared by the writes that overlap it.  Its collaborators are passed in: the scheduler
plugin (:mod:`~dask_zarr_cache.scheduler.state`) wires it to the cluster, the write load
generator (``benchmarks.write_load``) to simulated workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.clock import Clock, monotonic_clock
from dask_zarr_cache.core.exceptions import IndexUnavailableError
from dask_zarr_cache.core.protocol import SyncReply, WriteReply, pack, unpack
from dask_zarr_cache.writes.group_commit import GroupCommit
from dask_zarr_cache.writes.log import InvalidationLog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Container

    from dask_zarr_cache.core.config import CacheSettings

__all__ = ["APPLY_EVICT", "APPLY_WRITE", "WriteCoordinator"]

logger = logging.getLogger(__name__)

#: Worker handlers that apply a write and an eviction.
APPLY_WRITE = "zarr_cache_apply_write"
APPLY_EVICT = "zarr_cache_apply_evict"


class WriteCoordinator:
    """The scheduler's write history, the workers' confirmations and leases.

    Parameters
    ----------
    settings : CacheSettings
        ``write_wait``, ``write_push_timeout`` and ``write_index_timeout`` (replaced with
        the plugin's when they change).
    ask : callable
        Coroutine function ``ask(worker, op, timeout, **message)``: the reply of worker
        handler ``op``, or anything else when it could not be reached in time.
    members : callable
        The workers of the cluster now (a container of addresses).
    invalidate_index : callable
        Coroutine function dropping written keys from the index.
    group_commit : bool
        ``False``: each write is applied alone (for comparison, ``benchmarks.write_load``).
    clock : callable
        Seconds, monotonic: leases and waits (a fake one in unit tests).

    """

    def __init__(
        self,
        settings: CacheSettings,
        ask: Callable[..., Awaitable[Any]],
        members: Callable[[], Container[str]],
        invalidate_index: Callable[[list[str]], Awaitable[Any]],
        group_commit: bool = True,
        clock: Clock = monotonic_clock,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.log = InvalidationLog()
        #: Workers with a cache, and the highest write each has confirmed.
        self.workers: dict[str, int] = {}
        #: When each worker's last catch-up arrived (``clock``): its lease ran
        #: out ``write_wait`` after that at the latest.
        self._synced_at: dict[str, float] = {}
        self._ask = ask
        self._members = members
        self._invalidate_index = invalidate_index
        self._group_commit = group_commit
        self._changed = asyncio.Condition()
        self._batches: GroupCommit[WriteReply] = GroupCommit(self._write_batch)
        self._pushes: set[asyncio.Task[None]] = set()

    def reachable(self) -> list[str]:
        """Workers with a cache (caught up at least once) still in the cluster."""
        members = self._members()
        return [w for w in self.workers if w in members]

    # -- catching up -----------------------------------------------------------------------
    async def catch_up(self, worker: str, epoch: bytes | None, seq: int) -> tuple[SyncReply, bool]:
        """A worker catches up from ``seq`` of ``epoch``; the reply, and whether it is new.

        ``seq`` is also what it has applied: it counts as its acknowledgement.  Renews its
        lease (a worker that left the cluster is not counted in).
        """
        invalidations, applied = self.log.catch_up(epoch, seq)
        reply = SyncReply(self.log.epoch, self.log.seq, invalidations)
        if worker not in self._members():
            return reply, False
        self._synced_at[worker] = self.clock()  # in the step that read the history
        new = worker not in self.workers
        await self._acked(worker, applied)
        return reply, new

    def left(self, worker: str) -> None:
        """``worker`` left the cluster: no write waits for it any more."""
        self.workers.pop(worker, None)
        self._synced_at.pop(worker, None)

    # -- writes ----------------------------------------------------------------------------
    async def write(self, keys: list[str], prefixes: list[str], origin: str | None) -> WriteReply:
        """Record a write and return once no worker serves the bytes it replaced.

        ``origin``, a worker that already applied the write itself (its loop is blocked
        waiting for it), is not asked and the write goes alone; other writes are
        group-committed.
        """
        if origin is None and self._group_commit:
            return await self._batches.submit(keys, prefixes)
        seq, _replies, unreached = await self._apply(keys, prefixes, APPLY_WRITE, origin)
        return WriteReply(self.log.epoch, seq, unreached, _contested(keys))

    async def evict(
        self, keys: list[str], prefixes: list[str]
    ) -> tuple[int, dict[str, bytes], list[str]]:
        """A write that changed no byte (not batched: each reports what it dropped).

        Returns its number, each worker's packed
        :class:`~dask_zarr_cache.core.protocol.EvictReply`, and the workers that did not
        confirm it.
        """
        return await self._apply(keys, prefixes, APPLY_EVICT, None)

    async def _write_batch(self, keys: list[str], prefixes: list[str]) -> WriteReply:
        seq, _replies, unreached = await self._apply(keys, prefixes, APPLY_WRITE, None)
        return WriteReply(self.log.epoch, seq, unreached, _contested(keys))

    async def _apply(
        self, keys: list[str], prefixes: list[str], op: str, origin: str | None
    ) -> tuple[int, dict[str, Any], list[str]]:
        """Append a write to the history and apply it everywhere.

        Order: the history first (workers that are away learn it when they catch up),
        then, side by side, the index (drops entries and pending claims, so no reader
        that starts after the write joins a fetch from before it) and the workers (drop
        files, poison fetches in flight); it returns once both are done.  Only workers
        whose lease may still run are pushed to, and the write waits for each at most
        until its lease ran out (:meth:`_lease_end`): a worker frozen for longer costs one
        lease, not one per write.  An eviction waits for every push's reply (what was
        dropped); a write returns once the confirmations are in, and its pushes to
        workers that did not answer time out beside.  Returns the write's number, the
        replies of the workers that applied it, and the workers that did not confirm.
        """
        started = self.clock()
        entry = self.log.append(keys, prefixes)
        index = asyncio.ensure_future(self._drop_from_index(keys))
        reached: dict[str, Any] = {}  # workers that applied it, and their replies
        message = {
            "epoch": self.log.epoch,
            "seq": entry.seq,
            "keys": pack(keys),
            "prefixes": pack(prefixes),
        }
        pushes = [
            self._push(w, op, reached, message)
            for w in self.reachable()
            if w != origin and self.clock() < self._lease_end(w, started)
        ]
        if op == APPLY_EVICT and pushes:
            await asyncio.wait(pushes)
        unreached = await self._wait_for_acks(entry.seq, origin, reached, started)
        await index
        if unreached:
            logger.warning(
                "zarr cache: workers %s did not confirm write %d; their leases ran out, so "
                "they serve nothing until they catch up",
                unreached,
                entry.seq,
            )
        return entry.seq, dict(reached), unreached

    async def _drop_from_index(self, keys: list[str]) -> None:
        """The index forgets written keys, beside the pushes (both are done on return).

        Bounded: the index may live on the very worker whose loop waits for this write.
        Correctness does not rest on it: workers drop their files and fetches, and a
        reader the index sends to one of them meanwhile hears "missing" and asks again.
        """
        with contextlib.suppress(IndexUnavailableError, TimeoutError):
            await asyncio.wait_for(self._invalidate_index(keys), self.settings.write_index_timeout)

    def _push(
        self, worker: str, op: str, reached: dict[str, Any], message: dict[str, Any]
    ) -> asyncio.Task[None]:
        """Push one write to ``worker`` beside; its reply joins ``reached`` as an ack."""

        async def push() -> None:
            try:
                reply = await self._ask(worker, op, self.settings.write_push_timeout, **message)
            except Exception:  # not waited for beyond its lease; its catch-up applies it
                logger.exception("zarr cache: %s failed on %s", op, worker)
                return
            seq = _applied(op, reply)
            if seq is not None:
                reached[worker] = reply
                await self._acked(worker, seq)

        task = asyncio.ensure_future(push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return task

    def _lease_end(self, worker: str, started: float) -> float:
        """When the lease of ``worker`` has run out at the latest, for a write ``started``.

        Its lease runs from when its last catch-up was sent, which is before it arrived;
        ``write_wait`` has the margins for clocks and transit.  A catch-up that arrives
        later renews it, and moves this on.
        """
        return min(started, self._synced_at.get(worker, started)) + self.settings.write_wait

    async def _acked(self, worker: str, seq: int) -> None:
        """``worker`` confirmed every write up to ``seq``."""
        # Recorded before any await: a sync's reply was computed in the caller's step, so
        # a write appended after it must find this worker here and wait for it.
        self.workers[worker] = max(seq, self.workers.get(worker, 0))
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for_acks(
        self, seq: int, origin: str | None, reached: dict[str, Any], started: float
    ) -> list[str]:
        """Wait until every worker with a cache applied write ``seq``, or its lease ran out.

        Returns the workers that did not confirm it (their leases ran out).
        """

        def unconfirmed() -> list[str]:
            return [
                w
                for w in self.reachable()
                if self.workers[w] < seq and w != origin and w not in reached
            ]

        async with self._changed:
            while True:
                now = self.clock()
                ends = [e for w in unconfirmed() if (e := self._lease_end(w, started)) > now]
                if not ends:
                    return unconfirmed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(ends) - now)


def _applied(op: str, reply: Any) -> int | None:
    """A worker's highest write applied without a gap, from its reply (``None``: none)."""
    if op == APPLY_EVICT:
        return unpack(reply).applied if isinstance(reply, bytes) else None
    return reply if isinstance(reply, int) else None


def _contested(keys: list[str]) -> frozenset[str]:
    """Keys a batch of writes lists more than once: more than one write wrote them."""
    return frozenset(key for key, n in Counter(keys).items() if n > 1)
