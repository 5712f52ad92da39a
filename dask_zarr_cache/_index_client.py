"""How workers and the scheduler reach the index actor.

The scheduler knows where the index actor lives (``zarr_cache_index`` handler); callers
ask it once, then call the actor's methods directly on its host worker with the
``actor_execute`` handler, the same call a ``distributed.Actor`` handle makes.  When a
call fails the location is forgotten and asked again, which is how callers find an index
that was re-created elsewhere.  Keeping every index call behind :meth:`IndexClient.call`
is what would let the index be sharded later (hash of key -> actor).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta

from dask_zarr_cache._exceptions import ZarrCacheError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["IndexClient", "IndexUnavailableError"]


class IndexUnavailableError(ZarrCacheError):
    """The index actor does not exist yet, was lost, or did not answer."""


class IndexClient:
    """Calls methods of the cluster's index actor.

    Parameters
    ----------
    scheduler : rpc
        An rpc to the scheduler (``worker.scheduler``), or ``None`` when ``locate`` is
        given.
    rpc : callable
        Connection pool: ``rpc(address)`` returns an rpc to a worker.
    on_connect : callable, optional
        Coroutine function ``on_connect(call)`` run once per newly found index (e.g. to
        register a worker's files); ``call(function, *args)`` calls that index.
    locate : callable, optional
        Coroutine function returning ``{"address", "key"}`` or ``None``; defaults to
        asking the scheduler.

    """

    def __init__(
        self,
        scheduler: Any,
        rpc: Callable[[str], Any],
        on_connect: Callable[[Callable[..., Awaitable[Any]]], Awaitable[None]] | None = None,
        locate: Callable[[], Awaitable[dict[str, str] | None]] | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._rpc = rpc
        self._on_connect = on_connect
        self._locate = locate or self._ask_scheduler
        self._location: dict[str, str] | None = None
        self._lock: asyncio.Lock | None = None
        self.timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))

    @property
    def connected(self) -> bool:
        """Whether an index location is known (and, for workers, registered with)."""
        return self._location is not None

    @property
    def location(self) -> dict[str, str] | None:
        """``{"address", "key"}`` of the index actor in use, if any."""
        return self._location

    def reset(self) -> None:
        """Forget the index location; the next call looks it up (and registers) again."""
        self._location = None

    async def call(self, function: str, *args: Any) -> Any:
        """Call ``IndexActor.<function>(*args)`` and return its result.

        Raises
        ------
        IndexUnavailableError
            If there is no index, it was lost, or it did not answer within the timeout.

        """
        location = await self._ensure_location()
        try:
            return await self._execute(location, function, args)
        except IndexUnavailableError:
            if self._location is location:
                self._location = None
            raise

    async def _ensure_location(self) -> dict[str, str]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        location = self._location
        if location is not None:
            return location
        async with self._lock:
            if self._location is None:
                try:
                    location = await asyncio.wait_for(self._locate(), self.timeout)
                except (TimeoutError, OSError) as err:
                    raise IndexUnavailableError(f"scheduler did not answer: {err}") from err
                if not location:
                    raise IndexUnavailableError("the zarr cache index does not exist (yet)")
                if self._on_connect is not None:

                    async def call(function: str, *args: Any) -> Any:
                        return await self._execute(location, function, args)

                    await self._on_connect(call)
                self._location = location
            return self._location

    async def _ask_scheduler(self) -> dict[str, str] | None:
        return await self._scheduler.zarr_cache_index()

    async def _execute(self, location: dict[str, str], function: str, args: tuple) -> Any:
        try:
            reply = await asyncio.wait_for(
                self._rpc(location["address"]).actor_execute(
                    actor=location["key"], function=function, args=list(args), kwargs={}
                ),
                self.timeout,
            )
        except (TimeoutError, OSError, KeyError) as err:
            raise IndexUnavailableError(f"index at {location['address']}: {err!r}") from err
        if reply.get("status") != "OK":
            raise IndexUnavailableError(f"index call {function} failed: {reply.get('exception')!r}")
        return reply["result"]
