"""A worker cache's periodic upkeep: catch up, expire, report to the index, revalidate.

:meth:`Upkeep.flush` runs every ``zarr-cache.flush-interval`` (a periodic callback on the
worker's loop) and when a new index shard appears.  The catch-up with the write history
comes first: it renews the lease, without which the worker serves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.worker.peers import UNAVAILABLE
from dask_zarr_cache.worker.proofs import check_against_source

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from dask_zarr_cache.core.config import CacheSettings
    from dask_zarr_cache.index.client import IndexClient
    from dask_zarr_cache.worker.state import LocalState

__all__ = ["Upkeep"]

logger = logging.getLogger(__name__)


class Upkeep:
    """The flush of one worker's cache, and the index reports and revalidations beside it.

    Parameters
    ----------
    state : LocalState
        The worker's bookkeeping.
    index : IndexClient
        The worker's index calls.
    catch_up : callable
        Coroutine function: one catch-up with the scheduler's write history.
    sources : dict
        A source store of each dataset key prefix read here (revalidation lists them).
    settings : CacheSettings
        ``report_wait``, ``known_check_interval``, ``revalidate_after``, ``clock_margin``.
    clock : callable
        Seconds (wall clock).
    delete : callable
        Coroutine function deleting the files of the keys given.

    """

    def __init__(
        self,
        state: LocalState,
        index: IndexClient,
        catch_up: Callable[[], Awaitable[None]],
        sources: dict[str, Any],
        settings: CacheSettings,
        clock: Clock,
        delete: Callable[[Iterable[str]], Awaitable[None]],
    ) -> None:
        self.state = state
        self.index = index
        self.catch_up = catch_up
        self.sources = sources
        self.settings = settings
        self.clock = clock
        self.delete = delete
        self.closed = False
        self._lock = asyncio.Lock()
        self._reporting: asyncio.Future[None] | None = None
        self._revalidating: asyncio.Future[None] | None = None
        self._checked_at = clock()

    async def flush(self) -> None:
        """Catch up on writes, expire old files, report dropped copies to the index.

        The report runs beside: a shard that does not answer (its worker just died, and
        connecting waits out the timeout) must not hold up the catch-up, or this worker's
        lease would run out and it would stop serving its files.  A flush waits at most
        ``settings.report_wait`` for it, and starts none while one is still out.  A
        closed cache does nothing (its worker's connections may be closed already: a
        scheduler's message can still reach the handlers while the worker closes).
        """
        if self._lock.locked() or self.closed:
            return
        async with self._lock:
            try:
                await self.catch_up()
            except UNAVAILABLE as err:
                logger.debug("zarr cache could not reach the scheduler: %s", err)
            await self.delete(self.state.expired_keys())
        if self._reporting is None or self._reporting.done():
            await self.report()
        if self.settings.revalidate_after is not None and (
            self._revalidating is None or self._revalidating.done()
        ):
            self._revalidating = asyncio.ensure_future(self._revalidate())

    async def report(self) -> None:
        """Report dropped copies to the index beside; wait for it at most ``report_wait``.

        A report still out is waited for first (as long), so what was dropped since it
        started goes in this one.
        """
        if self._reporting is not None and not self._reporting.done():
            await asyncio.wait([self._reporting], timeout=self.settings.report_wait)
        self._reporting = asyncio.ensure_future(self._report())
        await asyncio.wait([self._reporting], timeout=self.settings.report_wait)

    async def idle(self) -> None:
        """Return once the revalidation started by the last flush, if any, ended."""
        if self._revalidating is not None:
            await self._revalidating

    async def _report(self) -> None:
        dropped = self.state.take_reports()
        check = self.clock() - self._checked_at >= self.settings.known_check_interval
        if not dropped and self.index.connected and not check:
            return
        if self.state.epoch is None:
            return  # nothing verified to register yet
        if check:
            self._checked_at = self.clock()
        with contextlib.suppress(*UNAVAILABLE):
            await self.index.touch(dropped, everywhere=check)

    async def _revalidate(self) -> None:
        """Check the objects due (``revalidate_after``) against their sources, in bulk.

        Beside the flush, one at a time.  Objects of a dataset no task read here yet (no
        store to list with) are not checked: they expire ``revalidate_grace`` later.
        """
        due = self.state.due_for_check()
        for prefix, source in list(self.sources.items()):
            mine = {k: e for k, e in due.items() if k.startswith(prefix)}
            if not mine:
                continue
            at = self.clock()
            current, stale = await check_against_source(
                mine, prefix, source, self.settings.clock_margin, self.settings.prove_timeout
            )
            await self.delete(self.state.checked(current, stale, checked_at=at))
            self.state.count(revalidated=len(current), revalidate_dropped=len(stale))
