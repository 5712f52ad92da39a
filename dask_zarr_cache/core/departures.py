"""Calls to other workers that end as soon as their destination is known to be gone.

distributed retries a refused connection until ``distributed.comm.timeouts.connect``
(30 s by default), so a call to a worker that just died waits that long.  The scheduler
notices the death at once and says so (a worker left, an index shard moved); the calls
still waiting on that destination then fail at once instead.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

__all__ = ["Departures", "DestinationGoneError"]

T = TypeVar("T")


class DestinationGoneError(ConnectionError):
    """The call's destination left (or moved) while the call waited for it."""


class Departures:
    """Calls under way by destination (any hashable naming where a call goes)."""

    def __init__(self) -> None:
        self._gone: dict[Hashable, asyncio.Future[str]] = {}

    async def call(self, destination: Hashable, call: Awaitable[T], timeout: float) -> T:
        """Await ``call`` for at most ``timeout`` seconds, or until ``destination`` is gone.

        Raises
        ------
        DestinationGoneError
            If :meth:`left` named ``destination`` meanwhile.
        TimeoutError
            If there was no answer within ``timeout``.

        """
        gone = self._gone.get(destination)
        if gone is None or gone.done():
            gone = self._gone[destination] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(call)
        waits: list[asyncio.Future[Any]] = [task, gone]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if gone.done():
            raise DestinationGoneError(f"{destination}: {gone.result()}")
        raise TimeoutError(f"{destination}: no answer within {timeout:g} s")

    def left(self, matches: Callable[[Any], bool], why: str) -> None:
        """The destinations ``matches`` accepts are gone: fail the calls waiting on them."""
        for destination, gone in list(self._gone.items()):
            if matches(destination):
                del self._gone[destination]
                if not gone.done():
                    gone.set_result(why)
