"""Hops between event loops, and the one case where a hop would deadlock.

zarr runs store coroutines on its own loop thread; the cache talks to other processes from
the worker's (or client's) loop.  A hop schedules a coroutine on that loop and awaits it.
If that loop's thread is itself blocked waiting for zarr (an ``async def`` task calling
zarr's synchronous API), the hop could never run: :func:`run_on` gives up on a hop that
has not *started* within ``wait`` seconds, and refuses further hops at once until the loop
runs again, so the read goes to the source instead of hanging.

Why not look at the loop thread's stack (``sys._current_frames()``) to see whether it is
in zarr's ``sync``: on Python <= 3.11 that call can deadlock the process when a garbage
collection starts inside it while another thread (distributed's profiler, every 10 ms)
makes the same call (CPython gh-106883, not fixed in 3.11).  The soak test hung on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import zarr.core.sync

from dask_zarr_cache.core.exceptions import ZarrCacheError

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["LoopBlockedError", "WorkerLoop", "event_loop_of", "run_on", "spawn_on", "zarr_loop"]

T = TypeVar("T")

#: Seconds a hop may wait for its loop to start running it (see the module docstring).
HOP_START_WAIT = 1.0


def event_loop_of(server: Any) -> asyncio.AbstractEventLoop:
    """The asyncio loop of a Dask worker or client.

    Tornado types their ``loop`` as a plain ``IOLoop``; distributed's is an ``AsyncIOLoop``.
    """
    loop: asyncio.AbstractEventLoop = server.loop.asyncio_loop
    return loop


#: Loops a hop found blocked (by ``id``), until they run again: the longest wait that did.
#: A hop that would wait no longer is refused at once; a more patient one still tries.
_blocked: dict[int, float] = {}


class LoopBlockedError(ZarrCacheError):
    """The target loop did not run the hop: blocked (maybe waiting for this very call)."""


async def run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], wait: float = HOP_START_WAIT
) -> T:
    """Run ``coro`` on ``loop`` and await its result from any loop.

    Raises
    ------
    LoopBlockedError
        If ``loop`` is not running, did not start ``coro`` within ``wait`` seconds, or
        did not run since a hop waiting as long or longer found it so.  ``coro`` then
        never runs.

    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return await coro
    if not loop.is_running() or wait <= _blocked.get(id(loop), -1.0):
        coro.close()
        raise LoopBlockedError("the worker's event loop is not running, or blocked")
    claim = threading.Lock()  # taken by whichever comes first: the hop's start, or giving up
    started: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def begin() -> T:
        if not claim.acquire(blocking=False):  # given up on before it started
            raise asyncio.CancelledError
        started.set_result(None)
        return await coro

    hop = asyncio.run_coroutine_threadsafe(begin(), loop)
    try:
        await asyncio.wait([asyncio.wrap_future(started)], timeout=wait)
    except asyncio.CancelledError:
        _abandon(claim, coro, hop)
        raise
    if not started.done() and _abandon(claim, coro, hop):
        _blocked[id(loop)] = max(wait, _blocked.get(id(loop), wait))
        loop.call_soon_threadsafe(_blocked.pop, id(loop), None)  # runs once it runs again
        raise LoopBlockedError(
            f"the worker's event loop did not run a hop within {wait} s (blocked, maybe in "
            "zarr's synchronous API waiting for this very read)"
        )
    return await asyncio.wrap_future(hop)


def _abandon(claim: threading.Lock, coro: Coroutine[Any, Any, Any], hop: Any) -> bool:
    """Give up on a hop; whether it had not started (then it never will)."""
    if claim.acquire(blocking=False):
        coro.close()
        hop.cancel()
        return True
    hop.cancel()  # it runs: cancel it there
    return False


def zarr_loop() -> asyncio.AbstractEventLoop:
    """The loop thread of zarr's own: where source stores do their I/O.

    A source store's file system may be one instance per process (fsspec caches them),
    its connections bound to the loop that first used them: zarr's.  Any other I/O on a
    source store goes there too.
    """
    return zarr.core.sync._get_loop()


def spawn_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> concurrent.futures.Future[T]:
    """Start ``coro`` on ``loop`` without waiting for it (it handles its own errors)."""
    return asyncio.run_coroutine_threadsafe(coro, loop)


class WorkerLoop:
    """The worker's event loop as the read path reaches it: its one way across loops.

    Store reads arrive on zarr's loop (or in a task thread); the index, the peers and the
    scheduler are only reachable from the worker's loop.  Every hop of the read path goes
    through :meth:`call` or :meth:`spawn`, so each one deals with a blocked loop the same
    way.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The worker's event loop.
    wait : float
        Seconds a hop waits to start before the loop counts as blocked.

    """

    def __init__(self, loop: asyncio.AbstractEventLoop, wait: float = HOP_START_WAIT) -> None:
        self.loop = loop
        self.wait = wait

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the worker's loop and await its result (see :func:`run_on`)."""
        return await run_on(self.loop, coro, self.wait)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the worker's loop without waiting for it."""
        return spawn_on(self.loop, coro)
