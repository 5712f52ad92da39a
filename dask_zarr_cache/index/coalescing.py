"""Coalescing requests: one call in flight per slot; what arrives meanwhile goes in the next.

At low load a request goes out in the next loop iteration (together with those asked in
the same iteration); under load, batches grow instead of messages, so the number of
calls a shard must answer stays bounded by round trips, not by readers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

__all__ = ["Coalescer"]

V = TypeVar("V")
R = TypeVar("R")


class Coalescer(Generic[V, R]):
    """Sends values in batches through ``send``, one batch in flight per slot.

    Parameters
    ----------
    send : callable
        Coroutine function ``send(slot, values)`` returning one result per value, in order.
    orphaned : callable, optional
        Coroutine function ``orphaned(slot, pairs)`` given the ``(value, result)`` pairs
        whose callers were cancelled before the reply came (to give back what they took).

    """

    def __init__(
        self,
        send: Callable[[Hashable, list[V]], Awaitable[list[R]]],
        orphaned: Callable[[Hashable, list[tuple[V, R]]], Awaitable[None]] | None = None,
    ) -> None:
        self._send = send
        self._orphaned = orphaned
        self._queued: dict[Hashable, list[tuple[V, asyncio.Future[R]]]] = {}
        self._sending: dict[Hashable, asyncio.Task[None]] = {}

    async def submit(self, slot: Hashable, value: V) -> R:
        """Send ``value`` with the next batch of ``slot``; return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        queue = self._queued.setdefault(slot, [])
        queue.append((value, future))
        if len(queue) == 1 and slot not in self._sending:
            loop.call_soon(self._send_next, slot)
        return await future

    def _send_next(self, slot: Hashable) -> None:
        batch = self._queued.pop(slot, None)
        if not batch:
            return
        task = asyncio.ensure_future(self._send_batch(slot, batch))
        self._sending[slot] = task
        task.add_done_callback(lambda _: self._sent(slot))

    def _sent(self, slot: Hashable) -> None:
        del self._sending[slot]
        if self._queued.get(slot):
            self._send_next(slot)

    async def _send_batch(self, slot: Hashable, batch: list[tuple[V, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send(slot, [value for value, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        orphans: list[tuple[V, Any]] = []
        for (value, future), result in zip(batch, results, strict=True):
            if future.done():
                orphans.append((value, result))
            else:
                future.set_result(result)
        if orphans and self._orphaned is not None:
            await self._orphaned(slot, orphans)
