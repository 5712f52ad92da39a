"""The scheduler plugin and the index shards' lifecycle, in process (``gen_cluster``).

A scheduler and two workers in this process, on one event loop: registration, the
handlers each side installs, where shards go and how one comes back after its host
leaves, the write handshake, which workers a check of old files asks.  Waits are on
state, never on fixed sleeps.  The same promises on process clusters with S3 are in
``tests/scheduler/test_state.py``.
"""

from __future__ import annotations

import asyncio

import dask
from distributed.protocol.pickle import dumps
from distributed.utils_test import gen_cluster
from zarr.storage import MemoryStore

from dask_zarr_cache import ZarrCachePlugin
from dask_zarr_cache.core.names import EXTENSION_NAME
from dask_zarr_cache.scheduler.state import ZarrCacheScheduler, scheduler_state


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` on the loop (the cluster acts between checks)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def caught_up(s, *workers) -> bool:
    state = scheduler_state(s)
    return state is not None and all(w.address in state.writes.workers for w in workers)


async def install(c, s, *workers) -> ZarrCacheScheduler:
    """Register the plugin (fast flushes); return once ``workers`` caught up once."""
    with dask.config.set({"zarr-cache.flush-interval": "50ms"}):
        await c.register_plugin(ZarrCachePlugin(max_size="1MiB"))
    await until(lambda: caught_up(s, *workers))
    return scheduler_state(s)


@gen_cluster(client=True)
async def test_registration_installs_both_sides_and_places_the_shard(c, s, a, b):
    state = await install(c, s, a, b)
    assert state is not None and state.installed
    for name, method in state.handlers.items():
        assert s.handlers[name] == method and method.__name__ == name
    for w in (a, b):
        cache = w.extensions[EXTENSION_NAME]
        for name, method in cache.handlers.items():
            assert w.handlers[name] == method and method.__name__ == name
    (location,) = await state.zarr_cache_index()
    assert location is not None and location["address"] in (a.address, b.address)


@gen_cluster(client=True)
async def test_a_lost_shard_comes_back_on_the_other_worker(c, s, a, b):
    state = await install(c, s, a, b)
    await until(lambda: state.shards.locations[0] is not None)
    host = state.shards.locations[0]["address"]
    other = b if host == a.address else a
    await (a if host == a.address else b).close()
    await until(
        lambda: (
            state.shards.locations[0] is not None
            and state.shards.locations[0]["address"] == other.address
        )
    )
    assert host not in state.writes.workers  # forgotten: writes no longer wait for it


@gen_cluster(client=True)
async def test_a_check_on_empty_disks_asks_no_worker(c, s, a, b):
    """Workers that found no files at start are not asked: a frozen one delays no reader."""
    state = await install(c, s, a, b)
    asked = []

    async def frozen(**kwargs):
        asked.append(kwargs)
        await asyncio.Event().wait()

    for w in (a, b):
        w.handlers["zarr_cache_apply_prove"] = frozen
    check = state.zarr_cache_prove(prefix="ns\x00", store=dumps(MemoryStore()), dataset=b"")
    assert await asyncio.wait_for(check, 5) == {"current": 0, "stale": 0}
    assert not asked
