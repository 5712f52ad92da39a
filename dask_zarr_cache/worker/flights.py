"""Loads in flight on one worker (in-process single-flight), and how a write poisons them.

Not thread-safe on its own: :class:`~dask_zarr_cache.worker.state.LocalState` calls it
with its one lock held.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from dask_zarr_cache.core.protocol import Payload

__all__ = ["ASKING", "PEER", "SOURCE", "Fetch", "Flights", "NotFetchingError"]

#: What a load is doing: asking the index who fetches, waiting on a peer, reading the source.
ASKING, PEER, SOURCE = "asking", "peer", "source"


class NotFetchingError(Exception):
    """The load waits on a peer: a peer asking for the key must not wait on it too."""


class Fetch:
    """One in-flight load of a key on this worker; its readers wait on :attr:`future`.

    A write of the key while it loads *poisons* it: the bytes still reach the readers that
    were already waiting (they started before the write returned), but are not cached, and
    readers that start later do not join it.

    Its :attr:`phase` (set by the leader, read by peers' requests on another thread) says
    whether a peer may wait on it: one that reads the source, yes; one that waits on
    another peer, no (peers naming each other would wait on each other until the read
    timeout); one that asks the index, until the index's answer arrives.
    """

    __slots__ = ("_asked", "future", "phase", "poisoned", "seq")

    def __init__(self, seq: int, phase: str = ASKING) -> None:
        self.future: concurrent.futures.Future[Payload | None] = concurrent.futures.Future()
        self.poisoned = False
        #: Writes known to this worker when the load started (stamped on the file).
        self.seq = seq
        self.phase = phase
        #: Done when the load stops asking the index (a new one each time it asks again).
        self._asked: concurrent.futures.Future[None] = concurrent.futures.Future()

    def enter(self, phase: str) -> None:
        """The leader moves to ``phase`` (:data:`ASKING`, :data:`PEER` or :data:`SOURCE`)."""
        if phase == self.phase:
            return
        leaves_asking = self.phase == ASKING
        if phase == ASKING:
            self._asked = concurrent.futures.Future()
        self.phase = phase
        if leaves_asking:  # after the phase is set: a waiter woken sees the new one
            self._asked.set_result(None)

    async def source_outcome(self) -> Payload | None:
        """The load's bytes for a peer: :meth:`outcome`, unless it waits on a peer itself.

        Raises
        ------
        NotFetchingError
            If the load is waiting on another peer (after its index answer, if it was
            asking the index).

        """
        if self.phase == ASKING and not self.future.done():
            waits: list[asyncio.Future[Any]] = [
                asyncio.wrap_future(self._asked),
                asyncio.wrap_future(self.future),
            ]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.phase != SOURCE and not self.future.done():
            raise NotFetchingError(self.phase)
        return await self.outcome()

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

    def begin(self, key: str, seq: int, phase: str = ASKING) -> tuple[Fetch, bool]:
        """The load of ``key`` to join, or a new one (stamped ``seq``, in ``phase``) to lead."""
        fetch = self._by_key.get(key)
        if fetch is not None:
            return fetch, False
        fetch = self._by_key[key] = Fetch(seq, phase)
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
