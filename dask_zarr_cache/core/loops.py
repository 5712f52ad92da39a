"""Hops between event loops, and the one case where a hop would deadlock.

zarr runs store coroutines on its own loop thread; the cache talks to other processes from
the worker's (or client's) loop.  A hop schedules a coroutine on that loop and awaits it.
If that loop's thread is itself blocked waiting for zarr (an ``async def`` task calling
zarr's synchronous API), the hop could never run: :func:`run_on` refuses at once instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import zarr.core.sync

from dask_zarr_cache.core.exceptions import ZarrCacheError

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["LoopBlockedError", "WorkerLoop", "check_loop", "run_on", "spawn_on"]

T = TypeVar("T")

_ZARR_SYNC = zarr.core.sync.sync.__code__


class LoopBlockedError(ZarrCacheError):
    """The target loop's thread is blocked waiting for this very store call."""


def check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Refuse at once if a hop to ``loop`` could never run (see module docstring).

    Raises
    ------
    LoopBlockedError
        If ``loop``'s thread is blocked in zarr's synchronous API (waiting for us), or
        ``loop`` is not running (in this process).

    """
    if not loop.is_running():  # stopped or closed: a hop would wait forever
        raise LoopBlockedError("the worker's event loop is not running")
    thread = getattr(loop, "_thread_id", None)
    if thread is None or thread == threading.get_ident():
        return
    # Never keep the dict of all frames in a local: it holds this very frame, and the
    # cycle would keep every thread's locals alive until a garbage collection, which then
    # runs their finalizers (zarr's own ZipFile included) on whatever thread it hits.
    frame = sys._current_frames().get(thread)
    if frame is None:  # a process forked from a task: the loop stayed behind
        raise LoopBlockedError("the worker's event loop does not run in this process")
    try:
        while frame is not None:
            if frame.f_code is _ZARR_SYNC:
                raise LoopBlockedError(
                    "the worker's event loop is blocked in zarr's synchronous API (an async "
                    "def task calling it)"
                )
            frame = frame.f_back
    finally:
        del frame


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` and await its result from any loop.

    Raises
    ------
    LoopBlockedError
        If ``loop``'s thread is blocked in zarr's synchronous API (waiting for us).

    """
    try:
        check_loop(loop)
    except LoopBlockedError:
        coro.close()
        raise
    try:
        if asyncio.get_running_loop() is loop:
            return await coro
    except RuntimeError:
        pass
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def spawn_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> concurrent.futures.Future[T]:
    """Start ``coro`` on ``loop`` without waiting for it (it handles its own errors)."""
    return asyncio.run_coroutine_threadsafe(coro, loop)


class WorkerLoop:
    """The worker's event loop as the read path reaches it: its one way across loops.

    Store reads arrive on zarr's loop (or in a task thread); the index, the peers and the
    scheduler are only reachable from the worker's loop.  Every hop of the read path goes
    through :meth:`call` or :meth:`spawn`, so each one checks for a blocked loop the same
    way.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The worker's event loop.

    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the worker's loop and await its result (see :func:`run_on`)."""
        return await run_on(self.loop, coro)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the worker's loop without waiting for it."""
        return spawn_on(self.loop, coro)
