"""Hops between event loops: results, a loop blocked waiting for the hop, no frame walks."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import warnings

import pytest
import zarr.core.sync

from dask_zarr_cache.core import loops
from dask_zarr_cache.core.loops import LoopBlockedError, run_on


@pytest.fixture
def other_loop():
    """A loop running in a thread of its own, like a worker's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def _where() -> int:
    return threading.get_ident()


def test_a_hop_runs_on_the_target_loop(other_loop):
    async def hop() -> int:
        return await run_on(other_loop, _where())

    assert zarr.core.sync.sync(hop()) == other_loop._thread_id


def test_a_loop_blocked_waiting_for_the_hop_is_refused_not_deadlocked(other_loop):
    # The worker's loop thread calls zarr's synchronous API (an ``async def`` task doing
    # so), and the store call it waits for needs a hop back to that very loop.
    ran = []

    async def store_call() -> str:
        async def on_worker_loop() -> str:
            ran.append(True)
            return "hopped"

        try:
            return await run_on(other_loop, on_worker_loop(), wait=0.2)
        except LoopBlockedError:
            return "refused"

    def blocked_task() -> list[str]:
        first = zarr.core.sync.sync(store_call())  # waits out the hop's start
        started = time.monotonic()
        second = zarr.core.sync.sync(store_call())  # refused at once: still blocked
        return [first, second, time.monotonic() - started]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "never awaited" coroutine
        done = asyncio.run_coroutine_threadsafe(_call(blocked_task), other_loop).result(10)
    assert done[:2] == ["refused", "refused"] and done[2] < 0.1
    assert not ran  # the refused hops never ran, not even later
    time.sleep(0.1)  # the loop runs again: hops go through
    assert zarr.core.sync.sync(_hop_to(other_loop)) == other_loop._thread_id
    assert not ran


def test_a_more_patient_hop_still_tries_a_loop_a_short_hop_found_blocked(other_loop):
    # Under load a loop may be slow, not deadlocked: a hop found it so after 0.2 s; one
    # willing to wait 5 s (a check of files, which no read waits on) waits and runs.
    other_loop.call_soon_threadsafe(time.sleep, 0.8)

    async def hops() -> list[str | int]:
        results: list[str | int] = []
        for wait in (0.2, 0.2, 5.0):
            try:
                results.append(await run_on(other_loop, _where(), wait=wait))
            except LoopBlockedError:
                results.append("refused")
        return results

    assert zarr.core.sync.sync(hops()) == ["refused", "refused", other_loop._thread_id]


async def _call(function):
    return function()  # on the loop's own thread: blocks it


async def _hop_to(loop) -> int:
    return await run_on(loop, _where())


def test_hops_never_walk_thread_stacks(other_loop, monkeypatch):
    # sys._current_frames() can deadlock Python <= 3.11 against distributed's profiler
    # (CPython gh-106883): a hop must not call it.
    def forbidden():
        raise AssertionError("sys._current_frames() called")

    monkeypatch.setattr(sys, "_current_frames", forbidden)
    assert zarr.core.sync.sync(_hop_to(other_loop)) == other_loop._thread_id
    assert loops.zarr_loop() is zarr.core.sync._get_loop()
