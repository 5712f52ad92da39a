"""Group commit: one batch of writes in flight, the writes that come meanwhile go together next.

Used on both sides of a write: a writer's event loop announces to the scheduler this way
(:mod:`~dask_zarr_cache.writes.announce`), and the scheduler applies the writes of every
writer this way (one entry in the history and one push per worker for all of them), so a
write's cost at the scheduler is shared by the writes that arrive while one is applied.
A lone write waits for nobody.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["GroupCommit"]

T = TypeVar("T")


@dataclass
class _Batch(Generic[T]):
    keys: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[T]] = field(default_factory=list)


class GroupCommit(Generic[T]):
    """Writes of keys and key prefixes, committed by ``commit`` in batches, one at a time.

    Parameters
    ----------
    commit : callable
        Coroutine function ``commit(keys, prefixes)`` that commits one batch; its result
        (or exception) is every write's in that batch.

    """

    def __init__(self, commit: Callable[[list[str], list[str]], Awaitable[T]]) -> None:
        self._commit = commit
        self._next: _Batch[T] = _Batch()
        self._sending = False
        self._task: asyncio.Future[None] | None = None

    async def submit(self, keys: list[str], prefixes: list[str]) -> T:
        """Commit a write with the next batch; returns that batch's result."""
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._next.keys += keys
        self._next.prefixes += prefixes
        self._next.waiters.append(waiter)
        if not self._sending:
            self._sending = True
            self._task = asyncio.ensure_future(self._send_all())
        return await waiter

    async def _send_all(self) -> None:
        try:
            while self._next.waiters:
                batch, self._next = self._next, _Batch()
                try:
                    result = await self._commit(batch.keys, batch.prefixes)
                except Exception as err:
                    for waiter in batch.waiters:
                        if not waiter.done():
                            waiter.set_exception(err)
                else:
                    for waiter in batch.waiters:
                        if not waiter.done():
                            waiter.set_result(result)
        finally:
            self._sending = False
