"""What tasks on this worker wrote, kept as the cluster's copy (``cache_writes``).

A task that writes through a ``ClusterCacheStore`` has the bytes in hand: after the
source has them and the write has its number, this worker keeps them as if it had read
them (:meth:`KeptWrites.keep`), so the next read of the key anywhere in the cluster is
served from here, not from the source.  Before the number exists, what the write replaced
is dropped here at once (:meth:`KeptWrites.drop`, then :meth:`KeptWrites.numbered`).

Here and not in :mod:`~dask_zarr_cache.writes`: keeping a copy takes this worker's state
and the index client, which the one-way imports put above the write protocol's folder.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.worker.peers import UNAVAILABLE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable

    from dask_zarr_cache.core.clock import Clock
    from dask_zarr_cache.core.protocol import Item, Payload, WriteReply
    from dask_zarr_cache.index.client import IndexClient
    from dask_zarr_cache.worker.flights import Fetch
    from dask_zarr_cache.worker.state import LocalState

__all__ = ["KeptWrites"]

logger = logging.getLogger(__name__)


class KeptWrites:
    """One worker's copies of what its tasks wrote.

    Parameters
    ----------
    state : LocalState
        The worker's bookkeeping.
    index : IndexClient
        The worker's index calls.
    max_size : int
        The worker's budget: bytes larger than it are not kept.
    keep_file : callable
        ``await keep_file(key, data, fetch, epoch, seq, created)``: the file written and
        admitted as ``fetch``'s, its index item, or ``None`` if not kept.
    delete : callable
        Coroutine function deleting the files of the keys given.
    spawn : callable
        Runs a coroutine on the worker's loop without waiting for it.
    clock : Clock
        The worker's clock (the copy's time).

    """

    def __init__(
        self,
        state: LocalState,
        index: IndexClient,
        max_size: int,
        keep_file: Callable[[str, Payload, Fetch, bytes, int, float], Awaitable[Item | None]],
        delete: Callable[[Iterable[str]], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        clock: Clock,
    ) -> None:
        self.state, self.index, self.max_size = state, index, max_size
        self.keep_file, self.delete, self.spawn, self.clock = keep_file, delete, spawn, clock

    async def drop(self, keys: list[str], prefixes: list[str]) -> None:
        """Drop what this worker's own write replaced, before the write has a number."""
        await self.delete(self.state.invalidate(keys, prefixes))

    def numbered(self, keys: list[str], prefixes: list[str], seq: int) -> None:
        """The write dropped by :meth:`drop` is write ``seq``."""
        self.state.numbered(keys, prefixes, seq)

    def keep(
        self, key: str, data: bytes, reply: WriteReply, since: tuple[bytes | None, int]
    ) -> None:
        """Keep the bytes a task wrote to ``key`` (beside the task).

        ``reply`` is the scheduler's for the write, ``since`` where this worker stood in
        the history before the bytes reached the source.  Kept as a load of ``key`` whose
        bytes are ``data``, only if they are the source's bytes for sure
        (:meth:`LocalState.begin_keep`); the index lists the copy unless another worker
        holds or fetches the key.
        """
        self.spawn(self._keep(key, data, reply, since))

    async def _keep(
        self, key: str, data: bytes, reply: WriteReply, since: tuple[bytes | None, int]
    ) -> None:
        if len(data) > self.max_size or not self.state.can_serve():
            return
        fetch = self.state.begin_keep(key, reply, since)
        if fetch is None:
            return
        kept = None
        try:
            kept = await self.keep_file(key, data, fetch, reply.epoch, reply.seq, self.clock())
        finally:
            fetch.future.set_result(data)  # readers that joined: the bytes just written
            self.state.end_fetch(key, fetch)
        if kept is not None:
            await self._list(kept)

    async def _list(self, item: Item) -> None:
        """The index learns of a written copy, unless another worker holds the key."""
        try:
            taken = await self.index.add([item])
        except UNAVAILABLE as err:
            logger.debug("zarr cache could not list written %s: %s", item.key, err)
            return
        for key in taken:  # another worker holds or fetches it: that copy stays
            await self.delete(self.state.remove_copy(key, item.tag))
