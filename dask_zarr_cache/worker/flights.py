"""Loads in flight on one worker (in-process single-flight), and how a write poisons them.

Not thread-safe on its own: :class:`~dask_zarr_cache.worker.state.LocalState` calls it
with its one lock held.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from dask_zarr_cache.core.protocol import Payload

__all__ = ["Fetch", "Flights"]


class Fetch:
    """One in-flight load of a key on this worker; its readers wait on :attr:`future`.

    A write of the key while it loads *poisons* it: the bytes still reach the readers that
    were already waiting (they started before the write returned), but are not cached, and
    readers that start later do not join it.
    """

    __slots__ = ("future", "poisoned", "seq")

    def __init__(self, seq: int) -> None:
        self.future: concurrent.futures.Future[Payload | None] = concurrent.futures.Future()
        self.poisoned = False
        #: Writes known to this worker when the load started (stamped on the file).
        self.seq = seq

    async def outcome(self) -> Payload | None:
        """Wait for the load's bytes (or its error) on the running event loop.

        A waiter that gives up (its task cancelled, a peer's wait timed out) leaves the
        load alone: cancelling a bare ``wrap_future`` would cancel :attr:`future` itself,
        and the leader and every other waiter would fail.
        """
        return await asyncio.shield(asyncio.wrap_future(self.future))


class Flights:
    """The loads in flight, by cache key."""

    def __init__(self) -> None:
        self._by_key: dict[str, Fetch] = {}

    def begin(self, key: str, seq: int) -> tuple[Fetch, bool]:
        """The load of ``key`` to join, or a new one (stamped ``seq``) the caller leads."""
        fetch = self._by_key.get(key)
        if fetch is not None:
            return fetch, False
        fetch = self._by_key[key] = Fetch(seq)
        return fetch, True

    def get(self, key: str) -> Fetch | None:
        """The load of ``key`` that new readers would join, if any."""
        return self._by_key.get(key)

    def futures(self) -> list[concurrent.futures.Future[Payload | None]]:
        """Futures of every load in flight."""
        return [f.future for f in self._by_key.values()]

    def end(self, key: str, fetch: Fetch) -> None:
        """The leader is done with ``fetch`` (however it ended)."""
        if self._by_key.get(key) is fetch:
            del self._by_key[key]

    def replaced(self, key: str, fetch: Fetch) -> bool:
        """Whether a newer load of ``key`` replaced ``fetch`` (a write came meanwhile)."""
        current = self._by_key.get(key)
        return current is not None and current is not fetch

    def poison(self, matches: Callable[[str], bool]) -> None:
        """A write replaced what the loads of matching keys read: detach and poison them."""
        for key in [k for k in self._by_key if matches(k)]:  # few: loads in flight
            self._by_key.pop(key).poisoned = True
