"""A worker's files of an earlier cluster: checked against their source before they serve.

Files found on disk that the write history cannot vouch for (another scheduler's, or older
than its log) wait, not served, until a listing of their source shows them unchanged.
Before a worker's first read below a dataset's key prefix it asks the scheduler to have
every worker check its files there (``zarr_cache_prove``, once per prefix and cluster);
each worker then runs :meth:`EarlierFiles.apply_prove` on its own files.  The sources
seen here are kept too: revalidation (:mod:`~dask_zarr_cache.worker.upkeep`) lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from distributed.protocol.pickle import dumps, loads

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.core.protocol import ProveReply, pack
from dask_zarr_cache.worker.peers import UNAVAILABLE
from dask_zarr_cache.worker.proofs import check_against_source

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from dask_zarr_cache.core.config import CacheSettings
    from dask_zarr_cache.core.loops import WorkerLoop
    from dask_zarr_cache.index.client import IndexClient
    from dask_zarr_cache.worker.state import LocalState

__all__ = ["EarlierFiles"]

logger = logging.getLogger(__name__)


class EarlierFiles:
    """The check of one worker's files of an earlier cluster, and the sources read here.

    Parameters
    ----------
    state : LocalState
        The worker's bookkeeping.
    scheduler : rpc
        An rpc to the scheduler (worker loop).
    index : IndexClient
        The worker's index calls.
    worker_loop : WorkerLoop
        Hops to the worker's loop.
    settings : CacheSettings
        ``prove_wait``, ``prove_timeout``, ``clock_margin``.
    clock : callable
        Seconds (wall clock).
    delete : callable
        Coroutine function deleting the files of the keys given.

    """

    def __init__(
        self,
        state: LocalState,
        scheduler: Any,
        index: IndexClient,
        worker_loop: WorkerLoop,
        settings: CacheSettings,
        clock: Clock,
        delete: Callable[[Iterable[str]], Awaitable[None]],
    ) -> None:
        self.state = state
        self.scheduler = scheduler
        self.index = index
        self.worker_loop = worker_loop
        self.settings = settings
        self.clock = clock
        self.delete = delete
        #: A source store of each dataset key prefix read here (for revalidation).
        self.sources: dict[str, Any] = {}
        #: Dataset key prefixes whose files of an earlier cluster were checked (or tried).
        self._settled: set[str] = set()
        self._settling: dict[str, asyncio.Future[None]] = {}

    async def settle(self, prefix: str, source: Any, dataset: Any) -> None:
        """Before this worker's first read below ``prefix``: have the cluster check its files.

        Files of an earlier cluster below the dataset's key prefix ``prefix`` are checked
        against ``source`` on every worker (``zarr_cache_prove``), once per cluster, so
        the first read finds them wherever they are.  Waits at most ``prove_wait``; the
        check goes on without this reader.  The scheduler also learns of ``dataset`` (the
        ``ClusterCacheStore`` read) for the dashboard's datasets table.
        """
        self.sources.setdefault(prefix, source)
        if prefix in self._settled:
            return
        with contextlib.suppress(*UNAVAILABLE):
            await asyncio.wait_for(
                self.worker_loop.call(self._settle(prefix, source, dataset)),
                self.settings.prove_wait,
            )

    async def _settle(self, prefix: str, source: Any, dataset: Any) -> None:
        """One check per prefix (worker loop); callers that give up leave it running."""
        check = self._settling.get(prefix)
        if check is None:
            check = asyncio.ensure_future(self._prove(prefix, source, dataset))
            self._settling[prefix] = check
        await asyncio.shield(check)

    async def _prove(self, prefix: str, source: Any, dataset: Any) -> None:
        try:
            await asyncio.wait_for(
                self.scheduler.zarr_cache_prove(
                    prefix=prefix, store=dumps(source), dataset=dumps(dataset)
                ),
                self.settings.prove_timeout,
            )
        except UNAVAILABLE as err:
            logger.info("zarr cache: files below %r were not checked: %r", prefix, err)
        self._settled.add(prefix)

    async def apply_prove(self, prefix: str, store: bytes) -> bytes:
        """Check this worker's files of an earlier cluster below ``prefix`` against the source.

        ``store`` is the source store (pickled) whose root is ``prefix``.  Files shown
        unchanged are served again and registered with the index; the rest are deleted.
        Returns a packed :class:`~dask_zarr_cache.core.protocol.ProveReply`.
        """
        entries = self.state.unproven(prefix)
        if not entries:
            return pack(ProveReply(0, 0))
        at = self.clock()  # the listing vouches for them from here (``revalidate_after``)
        current, stale = await check_against_source(
            entries, prefix, loads(store), self.settings.clock_margin, self.settings.prove_timeout
        )
        await self.delete(self.state.checked(current, stale, proven=True, checked_at=at))
        self.state.count(adopted=len(current), adopt_refused=len(stale))
        if current:  # the index learns of these (and only these) files now
            proved = [entry.item(key) for key, entry in current.items()]
            with contextlib.suppress(*UNAVAILABLE):
                await self.delete(self.state.remove(await self.index.add(proved)))
        return pack(ProveReply(len(current), len(stale)))
