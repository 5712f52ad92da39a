"""The index client over several shards, with the real shard hosts behind a fake network."""

from __future__ import annotations

import asyncio

import pytest

from dask_zarr_cache.core.exceptions import IndexUnavailableError
from dask_zarr_cache.core.protocol import FETCH, PEER, Decision
from dask_zarr_cache.index import client as index_client
from dask_zarr_cache.index.digests import key_digest, shard_of
from tests.fakes import FakeNetwork, Source, shard_address

A, B = "tcp://a:1", "tcp://b:1"
SHARDS = 3
KEYS = [f"ns\x00data.zarr/c/{i}" for i in range(60)]


@pytest.fixture
def net():
    return FakeNetwork(shards=SHARDS)


async def read_all(cache, keys=KEYS):
    return await asyncio.gather(*(cache.get(k, Source(k.encode())) for k in keys))


async def test_each_shard_holds_exactly_its_keys(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    assert await read_all(a) == [k.encode() for k in KEYS]
    await net.idle()  # commits
    for shard, index in enumerate(net.indexes):
        mine = {k for k in KEYS if shard_of(k, SHARDS) == shard}
        assert mine and {k for k in KEYS if key_digest(k) in index} == mine
        assert index.pending_count == 0
    # Concurrent misses cost one message per shard, not one per key; commits ride along
    # with later messages or go in a few of their own.
    assert sorted(n for n, _ in net.exchanges if n) == sorted(
        sum(1 for k in KEYS if shard_of(k, SHARDS) == s) for s in range(SHARDS)
    )
    assert sum(c for _, c in net.exchanges) == len(KEYS)


async def test_losing_one_shard_affects_only_its_keys(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    b = await net.worker(B, tmp_path / "b", clock, max_size=1_000_000)
    await read_all(a)
    await net.idle()
    lost = 1
    net.down.add(shard_address(lost))
    sources = {k: Source(k.encode()) for k in KEYS}
    assert await asyncio.gather(*(b.get(k, sources[k]) for k in KEYS)) == [k.encode() for k in KEYS]
    for k in KEYS:  # other shards still send b to a; the lost shard's keys come from source
        assert sources[k].reads == (1 if shard_of(k, SHARDS) == lost else 0), k
    # The shard comes back empty (a new shard); a's files of that shard only are registered.
    net.recreate(lost)
    net.down.discard(shard_address(lost))
    registered = net.index_calls("register")
    await a.zarr_cache_index_moved(lost)
    assert net.index_calls("register") == registered + 1
    mine = {k for k in KEYS if shard_of(k, SHARDS) == lost}
    assert {k for k in KEYS if key_digest(k) in net.indexes[lost]} == mine
    b.state.remove(list(b.state.entries))  # b drops what it fetched meanwhile
    b.state.hints._owners.clear()
    again = {k: Source(b"never") for k in KEYS}
    assert await asyncio.gather(*(b.get(k, again[k]) for k in KEYS)) == [k.encode() for k in KEYS]
    assert sum(s.reads for s in again.values()) == 0  # read once again


async def test_files_register_in_bounded_parts(net, clock, tmp_path, monkeypatch):
    monkeypatch.setattr(index_client, "REGISTER_BATCH", 4)
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    await read_all(a)
    await net.idle()
    for shard in range(SHARDS):
        net.recreate(shard)
    before = net.index_calls("register")
    a.index.reset()
    await a.flush()
    per_shard = [sum(1 for k in KEYS if shard_of(k, SHARDS) == s) for s in range(SHARDS)]
    assert net.index_calls("register") - before == sum(-(-n // 4) for n in per_shard)
    for shard, index in enumerate(net.indexes):
        assert len(index) == per_shard[shard]
    # An entry whose file is gone is forgotten at the last part of the next registration.
    gone = next(k for k in KEYS if shard_of(k, SHARDS) == 0)
    a.state.remove([gone])
    a.state.take_reports()  # as if the file vanished unreported
    a.index.reset(0)
    await a.flush()
    assert key_digest(gone) not in net.indexes[0] and len(net.indexes[0]) == per_shard[0] - 1


async def test_evictions_reach_the_shards_of_the_evicted_keys(net, clock, tmp_path):
    size = 100
    a = await net.worker(A, tmp_path / "a", clock, max_size=10 * size, policy="lru")
    for k in KEYS[:40]:  # one at a time: each admission may evict
        await a.get(k, Source(b"x" * size))
        await asyncio.sleep(0)
    await net.idle()  # commits
    held = set(a.state.entries)
    assert len(held) == 10 and a.state.entries.budget.used == 10 * size  # the worker's whole budget
    await a.flush()  # reports the evicted copies, each to its own shard
    indexed = {k for k in KEYS if any(key_digest(k) in index for index in net.indexes)}
    assert indexed == held


async def test_keys_asked_while_a_call_is_in_flight_share_the_next_call(net, clock, tmp_path):
    client = index_client.IndexClient(A, net.scheduler, net)
    gate = asyncio.Event()
    real = client._execute

    held = asyncio.Event()

    async def slow_first(*args):
        if not gate.is_set():
            held.set()
            await gate.wait()
        return await real(*args)

    client._execute = slow_first
    shard0 = [k for k in KEYS if shard_of(k, SHARDS) == 0]
    first = asyncio.ensure_future(client.acquire_one(shard0[0]))
    await held.wait()  # in flight, held
    rest = []
    for k in shard0[1:]:  # one per loop iteration: each would be its own message
        rest.append(asyncio.ensure_future(client.acquire_one(k)))
        await asyncio.sleep(0)
    gate.set()
    decisions = await asyncio.gather(first, *rest)
    assert all(d.kind == FETCH for d in decisions)
    assert net.index_calls("exchange") == 2  # the held one, then all the others together
    other = index_client.IndexClient(B, net.scheduler, net)
    assert {d.kind for d in await other.acquire(shard0)} == {"pending"}


async def test_summary_adds_up_shards_and_survives_a_lost_one(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    await read_all(a)
    await net.idle()
    summary = await a.index.summary()
    assert summary["entries"] == len(KEYS)
    assert summary["workers"][A]["entries"] == len(KEYS)
    assert [s["address"] for s in summary["shards"]] == [shard_address(s) for s in range(SHARDS)]
    net.down.add(shard_address(2))
    summary = await a.index.summary()
    assert summary["shards"][2] is None
    assert summary["entries"] == sum(1 for k in KEYS if shard_of(k, SHARDS) != 2)
    b = index_client.IndexClient(B, net.scheduler, net)
    decisions = await b.acquire([k for k in KEYS if shard_of(k, SHARDS) != 2])
    assert set(decisions) == {Decision(PEER, A)}


async def test_a_moved_shard_fails_the_calls_waiting_on_it_at_once(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    await a.flush()  # connected to every shard
    net.hung.add(shard_address(0))  # its worker died: calls to it hang until the timeout
    shard0 = [k for k in KEYS if shard_of(k, SHARDS) == 0]
    stuck = asyncio.ensure_future(a.index.acquire_one(shard0[0]))
    await net.stuck(1)
    queued = asyncio.ensure_future(a.index.acquire_one(shard0[1]))  # behind the stuck one
    await asyncio.sleep(0.01)
    assert not stuck.done() and not queued.done()
    net.recreate(0)  # the scheduler made it again elsewhere and told us
    net.hung.discard(shard_address(0))
    started = asyncio.get_running_loop().time()
    await a.zarr_cache_index_moved(0)
    with pytest.raises(IndexUnavailableError):
        await asyncio.wait_for(stuck, 1)  # this reader goes to the source now
    assert (await asyncio.wait_for(queued, 1)).kind == FETCH  # sent to the new shard
    assert asyncio.get_running_loop().time() - started < 0.5


async def test_a_hung_shard_never_holds_up_the_catch_up_with_writes(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, max_size=1_000_000)
    await read_all(a)
    await net.idle()
    for shard in range(SHARDS):
        net.hung.add(shard_address(shard))
    a.state.remove(KEYS[:3])  # something to report: the report hangs
    clock.now += 5
    await asyncio.wait_for(a.flush(), 2)
    clock.now += 5
    await asyncio.wait_for(a.flush(), 2)  # the report is still out: this one syncs only
    assert a.state.can_serve()  # caught up at both flushes: the lease never ran out
    clock.now += 5
    await asyncio.wait_for(a.flush(), 2)
    assert a.state.can_serve()
