"""The scheduler's side of the write protocol (``writes/coordinator.py``), in process.

A write returns once every worker applied it; concurrent writes share a batch (one push
per worker); a worker frozen past its lease costs one lease, not one per write.  The
same promises under kills, freezes and late messages on process clusters are in
``tests/test_consistency.py`` and the chaos suite.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import dask
from distributed.utils_test import gen_cluster

from dask_zarr_cache import ZarrCachePlugin
from dask_zarr_cache.core.config import CacheSettings
from dask_zarr_cache.core.names import EXTENSION_NAME
from dask_zarr_cache.core.protocol import pack, unpack
from dask_zarr_cache.scheduler.state import scheduler_state
from dask_zarr_cache.writes.coordinator import WriteCoordinator
from tests.fakes import FakeClock
from tests.scheduler.test_lifecycle import caught_up, install, until


@gen_cluster(client=True)
async def test_a_write_returns_once_every_worker_applied_it(c, s, a, b):
    state = await install(c, s, a, b)
    reply = unpack(await state.zarr_cache_write(keys=pack(["ns\x00k"]), prefixes=pack([])))
    assert reply.unreached == []
    for w in (a, b):  # applied before the write returned, not at the next catch-up
        assert w.extensions[EXTENSION_NAME].state.position()[1] >= reply.seq
    assert min(state.writes.workers[w.address] for w in (a, b)) >= reply.seq


@gen_cluster(client=True)
async def test_concurrent_writes_share_one_push_per_worker(c, s, a, b):
    state = await install(c, s, a, b)
    pushes = Counter()
    for w in (a, b):

        async def counted(w=w, original=w.handlers["zarr_cache_apply_write"], **message):
            pushes[w.address] += 1
            return await original(**message)

        w.handlers["zarr_cache_apply_write"] = counted
    keys = [f"ns\x00k{i}" for i in range(20)] + ["ns\x00same", "ns\x00same"]
    replies = await asyncio.gather(
        *(state.zarr_cache_write(keys=pack([k]), prefixes=pack([])) for k in keys)
    )
    replies = [unpack(r) for r in replies]
    assert all(r.unreached == [] for r in replies)
    assert pushes[a.address] == pushes[b.address] == len({r.seq for r in replies}) <= 2
    for w in (a, b):  # every write applied before it returned
        assert w.extensions[EXTENSION_NAME].state.position()[1] >= max(r.seq for r in replies)
    # Which of the two writes of one key reached the source last is unknown: said so.
    assert {k for r in replies for k in r.contested} == {"ns\x00same"}


@gen_cluster(client=True)
async def test_a_worker_frozen_past_its_lease_costs_one_lease_not_one_per_write(c, s, a, b):
    with dask.config.set({"zarr-cache.flush-interval": "50ms", "zarr-cache.write-lease": "1s"}):
        await c.register_plugin(ZarrCachePlugin(max_size="1MiB"))
    await until(lambda: caught_up(s, a, b))
    state = scheduler_state(s)
    pushed = []

    async def frozen(seq, **message):
        pushed.append(seq)
        await asyncio.Event().wait()

    b.periodic_callbacks["zarr-cache-flush"].stop()  # b catches up no more
    b.handlers["zarr_cache_apply_write"] = frozen
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = unpack(await state.zarr_cache_write(keys=pack(["ns\x00k"]), prefixes=pack([])))
    assert first.unreached == [b.address]  # waited for b's lease to run out
    assert loop.time() - started <= state.settings.write_wait + 0.5
    started = loop.time()
    second = unpack(await state.zarr_cache_write(keys=pack(["ns\x00k"]), prefixes=pack([])))
    assert second.unreached == [b.address]
    assert loop.time() - started < 0.5  # b serves nothing: no wait, and no push
    assert pushed == [first.seq]
    assert a.extensions[EXTENSION_NAME].state.position()[1] >= second.seq


async def test_leases_run_on_the_coordinator_s_clock():
    # No real time passes: the fake clock alone says whose lease still runs.
    clock = FakeClock()
    pushed: list[str] = []
    applied: dict[str, int] = {}

    async def ask(worker, op, timeout, seq, **message):
        pushed.append(worker)
        applied[worker] = seq
        return seq

    async def invalidate_index(keys):
        return None

    coordinator = WriteCoordinator(
        CacheSettings(max_size=1), ask, lambda: {"a", "b"}, invalidate_index, clock=clock
    )
    await coordinator.catch_up("a", None, 0)
    await coordinator.catch_up("b", None, 0)
    first = await coordinator.write(["ns\x00k"], [], None)
    assert sorted(pushed) == ["a", "b"] and first.unreached == []  # both leases run
    clock.now += coordinator.settings.write_wait / 2
    await coordinator.catch_up(
        "a", coordinator.log.epoch, first.seq
    )  # a renews its lease; b does not
    clock.now += coordinator.settings.write_wait / 2 + 0.1  # b's has run out
    pushed.clear()
    second = await asyncio.wait_for(coordinator.write(["ns\x00k"], [], None), 1.0)
    assert pushed == ["a"] and second.unreached == ["b"]  # b: neither pushed nor waited for
