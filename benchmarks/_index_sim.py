"""Simulated workers that drive the real index shards over real comms.

A load process runs many simulated workers on one event loop.  Each is what a worker's
cache is to the index: a real :class:`~dask_zarr_cache.index.client.IndexClient` (its
batching, routing and registration), an address, and the keys it holds.  Its callers
(the worker's task threads) ask for keys from a trace, one at a time, as fast as answers
come: a fetch decision is committed in the background, as a worker commits after its
source read.  Every acquire's latency is recorded.

Traces:

- ``cold``: every read is of a key nobody asked for before (a cold scan): all fetches,
  and as many commits.
- ``warm``: reads of keys other simulated workers hold (registered at start): peer
  decisions.
- ``skewed``: 80% of reads on the held keys, 20% on new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
from distributed.core import ConnectionPool

from dask_zarr_cache.core.exceptions import IndexUnavailableError
from dask_zarr_cache.core.protocol import FETCH, Item
from dask_zarr_cache.index.client import IndexClient

TRACES = ("cold", "warm", "skewed")


def held_key(n: int) -> str:
    """The ``n``-th key held somewhere at the start (its holder: ``n % workers``)."""
    return f"sim\x00held/{n}"


@dataclass
class LoadSpec:
    """What one load process does (picklable: it crosses to a spawned process)."""

    scheduler: str
    process: int
    processes: int
    workers: int  #: simulated workers in the whole run
    callers: int  #: callers in the whole run, spread round-robin over workers
    trace: str
    held: int  #: keys held by the simulated workers at the start, in the whole run
    start_at: float  #: wall-clock time the measured window starts
    seconds: float
    #: Optional (time, address) of a shard host to watch: acquires that fail or answer
    #: "fetch" for a held key after it are duplicates (a real worker reads the source).
    events: list[tuple[float, str]] = field(default_factory=list)


class CountingClient(IndexClient):
    """An :class:`IndexClient` that counts its calls per function."""

    calls: Counter[str]

    async def _execute(self, shard: int, location: Any, handler: str, kwargs: dict) -> Any:
        self.calls[handler.removeprefix("zarr_cache_index_")] += 1
        return await super()._execute(shard, location, handler, kwargs)


class SimWorker:
    """One simulated worker: an index client and the keys it holds."""

    def __init__(self, address: str, number: int, spec: LoadSpec, pool: Any, calls: Counter):
        self.address = address
        self.held = {
            held_key(n): Item(held_key(n), 1, 1) for n in range(number, spec.held, spec.workers)
        }
        self.client = CountingClient(address, pool(spec.scheduler), pool, on_connect=self._register)
        self.client.calls = calls
        self.client.timeout = 60.0
        self.background: set[asyncio.Task[Any]] = set()

    async def _register(self, client: IndexClient, shard: int) -> None:
        for key in await client.register(shard, list(self.held.values())):  # held elsewhere
            del self.held[key]

    def commit_later(self, key: str) -> None:
        task = asyncio.ensure_future(self._commit(key))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _commit(self, key: str) -> None:
        item = Item(key, 1, 1)
        with contextlib.suppress(IndexUnavailableError, OSError):
            if not (await self.client.commit_one(item)).rejected:
                self.held[key] = item


def _keys(spec: LoadSpec, caller: int, me: int) -> Any:
    """The trace of one caller: an endless iterator of keys."""
    rng = random.Random(caller)
    fresh = (f"sim\x00new/{caller}/{i}" for i in itertools.count())
    while True:
        if spec.trace == "cold" or (spec.trace == "skewed" and rng.random() < 0.2):
            yield next(fresh)
        else:
            n = rng.randrange(spec.held)
            if n % spec.workers == me:  # its own key: a local hit, never asked
                continue
            yield held_key(n)


async def _caller(sim: SimWorker, keys: Any, spec: LoadSpec, out: dict[str, Any]) -> None:
    end = spec.start_at + spec.seconds
    latencies, kinds, failures = out["latencies"], out["kinds"], out["failures"]
    while time.time() < end:
        key = next(keys)
        if key in sim.held:  # a local hit: no index call
            await asyncio.sleep(0)
            continue
        started = time.perf_counter()
        try:
            decision = await sim.client.acquire_one(key)
        except (IndexUnavailableError, OSError) as err:
            if (now := time.time()) >= spec.start_at:
                failures.append(now)
                out["errors"][f"{type(err).__name__}: {str(err)[:60]}"] += 1
            await asyncio.sleep(0.05)  # a real worker reads the source meanwhile
            continue
        if (now := time.time()) >= spec.start_at:
            latencies.append(time.perf_counter() - started)
            kinds[decision.kind] += 1
            if decision.kind == FETCH and key.startswith("sim\x00held/"):
                out["duplicates"].append(now)
        if decision.kind == FETCH:
            sim.commit_later(key)


async def _follow_moves(sims: list[SimWorker], scheduler: Any, end: float) -> None:
    """Re-register with a shard created anew, within half a second.

    Stands in for the scheduler's ``zarr_cache_index_moved`` broadcast, which reaches
    real workers (simulated ones are not the scheduler's workers) and makes them
    re-register their files of that shard at once.
    """
    last = await scheduler.zarr_cache_index()
    while time.time() < end:
        await asyncio.sleep(0.5)
        layout = await scheduler.zarr_cache_index()
        for shard, (old, new) in enumerate(zip(last, layout, strict=True)):
            if new is not None and new != old:
                for sim in sims:
                    sim.client.moved(shard)
                await asyncio.gather(
                    *(sim.client.touch([]) for sim in sims), return_exceptions=True
                )
        last = layout


async def drive(spec: LoadSpec) -> dict[str, Any]:
    """Run one load process: connect its workers, run the trace, return what it saw."""
    pool = await ConnectionPool(limit=2048, timeout=60)
    calls: Counter[str] = Counter()
    mine = range(spec.process, spec.workers, spec.processes)
    sims = [SimWorker(f"tcp://sim-{n}:1", n, spec, pool, calls) for n in mine]
    # Connect (and register held keys) before the clock starts.
    connecting = time.time()
    await asyncio.gather(*(s.client.touch([], everywhere=True) for s in sims))
    connected = time.time() - connecting
    out: dict[str, Any] = {
        "latencies": [],
        "kinds": Counter(),
        "failures": [],
        "duplicates": [],
        "errors": Counter(),
    }
    # This process's callers, spread round-robin over its workers.
    callers = range(spec.process, spec.callers, spec.processes)
    tasks = [
        _caller(sims[i % len(sims)], _keys(spec, c, mine[i % len(sims)]), spec, out)
        for i, c in enumerate(callers)
    ]
    await asyncio.sleep(max(0.0, spec.start_at - 1.0 - time.time()))  # 1 s to warm up

    async def cpu_at(when: float) -> float:
        await asyncio.sleep(max(0.0, when - time.time()))
        if when == spec.start_at:
            calls.clear()
        times = psutil.Process(os.getpid()).cpu_times()
        return times.user + times.system

    start, end, *_ = await asyncio.gather(
        cpu_at(spec.start_at),
        cpu_at(spec.start_at + spec.seconds),
        _follow_moves(sims, pool(spec.scheduler), spec.start_at + spec.seconds),
        *tasks,
    )
    for sim in sims:
        await asyncio.gather(*sim.background, return_exceptions=True)
    await pool.close()
    out["calls"] = dict(calls)
    out["callers"] = len(tasks)
    out["cpu"] = end - start
    out["connect seconds"] = connected
    out["late"] = connecting + connected > spec.start_at - 1.0
    return out


def run_process(spec: LoadSpec) -> dict[str, Any]:
    """Entry point of a spawned load process."""
    return asyncio.run(drive(spec))
