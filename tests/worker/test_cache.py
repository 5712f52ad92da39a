"""The worker cache's logic with a fake clock and an in-process network: milliseconds each.

The process-cluster tests (test_worker*.py, test_consistency.py) show the same promises on
real parts; these pin down the logic, including orderings a cluster rarely produces.
"""

from __future__ import annotations

import asyncio
import errno

import pytest
from distributed.protocol.pickle import dumps

from dask_zarr_cache.core.protocol import ProveReply, unpack
from dask_zarr_cache.identity.keys import IMMUTABLE
from dask_zarr_cache.identity.listing import SourceObject
from dask_zarr_cache.index.digests import key_digest
from tests.fakes import INDEX, FakeClock, FakeNetwork, Source

A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"
K = "ns\x00data.zarr/c/0"


@pytest.fixture
def net():
    return FakeNetwork()


async def test_concurrent_readers_of_one_key_make_one_source_read(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    source = Source()
    source.gate = asyncio.Event()
    readers = [asyncio.ensure_future(a.get(K, source)) for _ in range(10)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await asyncio.gather(*readers) == [b"bytes"] * 10
    assert source.reads == 1
    assert await a.get(K, source) == b"bytes" and source.reads == 1  # now a local hit
    assert a.counters.hits == 1


async def test_a_reader_that_gives_up_leaves_the_load_to_the_others(net, clock, tmp_path):
    # A reader joined to a load can be cancelled (its task, or a peer's wait for it timed
    # out); the load and everyone else waiting on it must not notice.
    a = await net.worker(A, tmp_path / "a", clock)
    source = Source()
    source.gate = asyncio.Event()
    leader = asyncio.ensure_future(a.get(K, source))
    await source.reached.wait()
    quitter, stayer = (asyncio.ensure_future(a.get(K, source)) for _ in range(2))
    await asyncio.sleep(0.01)
    quitter.cancel()
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await leader == b"bytes"
    assert await stayer == b"bytes"
    assert quitter.cancelled()
    assert source.reads == 1


async def test_a_read_after_a_write_never_joins_a_fetch_from_before_it(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    old = Source(b"old")
    old.gate = asyncio.Event()
    early = asyncio.ensure_future(a.get(K, old))
    await old.reached.wait()
    await net.write([K])  # the write returns here
    new = Source(b"new")
    assert await a.get(K, new) == b"new"  # started after the write: its own fetch
    old.gate.set()
    assert await early == b"old"  # started before the write: may see the old bytes
    await net.idle()
    assert await a.get(K, Source(b"never read")) == b"new"  # the old bytes were not kept
    assert net.index.owner(key_digest(K)) == A


async def test_a_write_that_arrives_twice_is_applied_once(net, clock, tmp_path):
    # Chaos seed 2000: a write's push to B was held back; B's catch-up brought the write,
    # the write returned, and B began a fresh fetch. The late push must not poison it
    # (nor, in the second round, drop the file it kept): A would read the source again.
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    seq = await net.write([K], late={B})
    await b.sync()  # the catch-up applies the write first
    src = Source(b"new")
    src.gate = asyncio.Event()
    load = asyncio.ensure_future(b.get(K, src))
    await src.reached.wait()
    await net.push(B, seq)  # the held-back push, while B reads the new bytes
    src.gate.set()
    assert await load == b"new"
    await net.idle()
    seq = await net.write([K], late={B})  # round two: the copy is kept before the push
    await b.sync()
    assert await b.get(K, src) == b"new"
    await net.idle()
    await net.push(B, seq)
    await b.flush()
    await net.idle()
    assert await a.get(K, src) == b"new"
    assert src.reads == 2  # once per write, cluster-wide


async def test_an_eviction_drops_a_prefix_everywhere_and_keeps_no_load_of_it(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    dataset, other = "ns\x00data.zarr/", "ns\x00other.zarr/c/0"
    await a.get(dataset + "c/0", Source(b"x" * 10))
    await b.get(dataset + "c/1", Source(b"y" * 20))
    await a.get(other, Source(b"kept"))
    slow = Source(b"old")
    slow.gate = asyncio.Event()
    loading = asyncio.ensure_future(a.get(dataset + "c/2", slow))
    await slow.reached.wait()
    await net.idle()
    replies = await net.evict(prefixes=[dataset])
    assert {w: (r.objects, r.nbytes) for w, r in replies.items()} == {A: (1, 10), B: (1, 20)}
    assert all(r.applied == 1 for r in replies.values())
    # The index heard at once: nobody is sent to a copy that is gone.
    assert net.index.owner(key_digest(dataset + "c/1")) is None
    slow.gate.set()
    assert await loading == b"old"  # it started before the eviction
    await net.idle()
    for key in ("c/0", "c/1", "c/2"):  # each read from the source again, the load not kept
        fresh = Source(b"new")
        assert await a.get(dataset + key, fresh) == b"new" and fresh.reads == 1
    assert await a.get(other, Source(b"never read")) == b"kept"  # outside the prefix


async def test_every_way_out_of_a_fetch_releases_the_claim(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    failing = Source()
    failing.error = PermissionError("403")
    with pytest.raises(PermissionError):
        await a.get(K, failing)
    await net.idle()
    assert net.index.pending_count == 0
    absent = Source(None)
    assert await a.get(K, absent) is None
    await net.idle()
    assert net.index.pending_count == 0
    slow = Source()
    slow.gate = asyncio.Event()
    task = asyncio.ensure_future(a.get(K, slow))
    await slow.reached.wait()
    assert net.index.pending_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await net.idle()
    assert net.index.pending_count == 0
    too_big = Source(b"x" * 20_000)  # over max_size: served, not cached
    assert await a.get(K, too_big) == b"x" * 20_000
    await net.idle()
    assert net.index.pending_count == 0 and K not in a.state.entries


async def test_index_trouble_falls_back_to_the_source(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    net.down.add(INDEX)
    a.index.reset()
    source = Source()
    assert await a.get(K, source) == b"bytes"
    assert a.counters.fallbacks == 1 and source.reads == 1


async def test_peer_reads_use_owner_hints_and_skip_a_dead_peer(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    source = Source()
    await a.get(K, source)
    await net.idle()  # the commit
    assert await b.get(K, source) == b"bytes" and source.reads == 1
    assert b.counters.peer_reads == 1
    acquires = net.index_calls("exchange")
    b.state.remove([K])  # b does not keep peer copies: its next read asks a again
    assert await b.get(K, source) == b"bytes"
    assert net.index_calls("exchange") == acquires  # straight to the hinted owner
    # a dies: b asks it once, tells the index, fetches itself; a is not asked again.
    net.down.add(A)
    calls_to_a = sum(1 for addr, _ in net.calls if addr == A)
    assert await b.get("ns\x00data.zarr/c/1", Source(b"other")) == b"other"
    assert await b.get(K, source) == b"bytes"
    assert source.reads == 2  # b fetched it itself, once
    await net.idle()
    assert sum(1 for addr, _ in net.calls if addr == A) <= calls_to_a + 1
    assert await b.get(K, source) == b"bytes"  # now local on b
    assert sum(1 for addr, _ in net.calls if addr == A) <= calls_to_a + 1


async def test_a_peer_reply_that_lands_with_its_departure_leaves_no_hint(tmp_path):
    # Chaos seed 2033: B froze with A's reply on its socket; on thaw the notice that A
    # left was handled first. A hint to the dead A must not come back with the reply.
    clock = FakeClock()
    net = FakeNetwork()
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock, read_timeout=0.3)
    c = await net.worker(C, tmp_path / "c", clock)
    await a.get(K, Source(b"old"))
    await net.idle()
    gate, served, serve = asyncio.Event(), asyncio.Event(), a.zarr_cache_get

    async def held(key, probe=False):
        reply = await serve(key, probe)
        served.set()
        await gate.wait()
        return reply

    a.zarr_cache_get = held
    read = asyncio.ensure_future(b.get(K, Source(b"never")))
    await served.wait()
    gate.set()
    await b.zarr_cache_worker_left(A)  # handled before b's read takes the reply
    assert await read == b"old"
    net.hung.add(A)  # dead: a connect is retried until the timeout
    net.index.remove_worker(A)
    await net.write([K])
    source = Source(b"new")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.gather(c.get(K, source), b.get(K, source)) == [b"new", b"new"]
    assert source.reads == 1 and b.counters.fallbacks == 0
    assert loop.time() - started < 0.2  # nobody waited on the dead peer


async def test_a_departed_peer_is_forgotten_without_asking_it(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    await a.get(K, Source())
    await net.idle()
    await b.get(K, Source())
    b.state.remove([K])
    await b.zarr_cache_worker_left(A)
    net.index.remove_worker(A)
    before = sum(1 for addr, _ in net.calls if addr == A)
    assert await b.get(K, Source(b"again")) == b"again"
    assert sum(1 for addr, _ in net.calls if addr == A) == before


async def test_ttl_with_a_fake_clock(clock, tmp_path):
    net = FakeNetwork(max_age_seconds=60)
    a = await net.worker(A, tmp_path / "a", clock, max_age_seconds=60)
    source = Source()
    await a.get(K, source)
    clock.now += 59
    await a.flush()
    await a.get(K, source)
    assert source.reads == 1
    clock.now += 2
    await a.flush()  # the sweep deletes the expired file
    assert K not in a.state.entries and not a.disk.path_of(K).exists()
    await a.get(K, source)
    assert source.reads == 2 and a.counters.expired == 1


async def test_a_snapshot_s_objects_never_expire(clock, tmp_path):
    net = FakeNetwork(max_age_seconds=60)
    a = await net.worker(A, tmp_path / "a", clock, max_age_seconds=60)
    snapshot, mortal = IMMUTABLE + "snap\x00a/c/0", "ns\x00a/c/0"
    source = Source()
    await a.get(snapshot, source)
    await a.get(mortal, source)
    clock.now += 3600
    await a.flush()  # the TTL sweep
    assert set(a.state.entries) == {snapshot}
    assert await a.get(snapshot, Source(b"never")) == b"bytes" and a.counters.expired == 1


async def test_a_worker_that_cannot_catch_up_serves_nothing(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, write_lease=10.0)
    source = Source()
    await a.get(K, source)
    net.scheduler.reachable = False  # a partition
    clock.now += 11
    await a.flush()
    assert not a.state.can_serve()
    assert await a.get(K, source) == b"bytes" and source.reads == 2  # read through
    assert await a.zarr_cache_get(K) == {"status": "missing"}  # nor to peers
    net.scheduler.reachable = True
    await a.flush()
    b = await net.worker(B, tmp_path / "b", clock, write_lease=10.0)
    assert await a.get(K, source) == b"bytes" and source.reads == 2  # serving again
    assert await b.get(K, source) == b"bytes" and b.counters.peer_reads == 1


async def test_a_restart_drops_files_a_write_replaced_while_it_was_away(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    keep, replaced = "ns\x00d/keep", "ns\x00d/replaced"
    for key in (keep, replaced):
        await a.get(key, Source(b"v1"))
    await a.close()
    del net.caches[A]
    await net.write([replaced])  # while a is down
    a2 = await net.worker(A, tmp_path / "a", clock)
    assert set(a2.state.entries) == {keep}
    assert not a2.disk.path_of(replaced).exists()
    assert await a2.get(keep, Source(b"never")) == b"v1"


async def test_files_from_another_scheduler_wait_for_a_check_of_the_source(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    await a.get(K, Source(b"v1"))
    await a.close()
    fresh = FakeNetwork()  # a new scheduler: a new, unrelated history
    a2 = await fresh.worker(A, tmp_path / "a", clock)
    assert not a2.state.entries[K].proven  # kept, but not served
    assert await a2.get(K, Source(b"v2")) == b"v2"  # read from the source instead
    assert a2.state.entries[K].proven  # the new copy replaced it


async def test_lost_history_keeps_files_only_until_the_source_is_checked(net, clock, tmp_path):
    net.scheduler.log.max_keys = 2
    a = await net.worker(A, tmp_path / "a", clock)
    await a.get(K, Source())
    await a.close()
    del net.caches[A]
    for i in range(5):
        await net.write([f"ns\x00other/{i}"])
    a2 = await net.worker(A, tmp_path / "a", clock)
    assert [e.proven for e in a2.state.entries.values()] == [False]
    assert a2.state.lookup(K) == (None, False)


DATASET = "ns\x00data.zarr/"


async def _from_an_earlier_cluster(clock, tmp_path, sizes):
    """A worker of a new cluster on the disk of an old one that read ``sizes`` (key: size)."""
    old = FakeNetwork()
    a = await old.worker(A, tmp_path / "a", clock)
    for key, size in sizes.items():
        await a.get(DATASET + key, Source(b"o" * size))
    await a.close()
    new = FakeNetwork()
    return new, await new.worker(A, tmp_path / "a", clock)


def fake_source(monkeypatch, list_directory) -> None:
    """Listings come from ``list_directory``, on the test's loop (not zarr's)."""
    monkeypatch.setattr("dask_zarr_cache.worker.proofs.list_directory", list_directory)
    monkeypatch.setattr("dask_zarr_cache.worker.proofs.zarr_loop", asyncio.get_running_loop)


async def test_a_check_of_the_source_keeps_exactly_the_unchanged_files(
    clock, tmp_path, monkeypatch
):
    sizes = {"c/0": 10, "c/1": 10, "c/2": 10, "c/3": 10, "d/0": 10}
    net, a = await _from_an_earlier_cluster(clock, tmp_path, sizes)
    read_at = clock()  # every file above was read at this (fake) time
    margin = a.settings.clock_margin
    listings = {
        "c": {
            "0": SourceObject(10, read_at - margin - 1),  # unchanged: kept
            "1": SourceObject(10, read_at + 5),  # rewritten since (same size): dropped
            "2": SourceObject(11, read_at - margin - 1),  # another size: dropped
            "3": SourceObject(10, read_at - margin / 2),  # too close to tell: dropped
        },
        "d": {},  # gone from the source: dropped
    }
    asked = []

    async def list_directory(store, directory):
        asked.append(directory)
        return listings[directory]

    fake_source(monkeypatch, list_directory)
    reply = ProveReply(*unpack(await a.zarr_cache_apply_prove(DATASET, dumps(None))))
    assert reply == (1, 4) and sorted(asked) == ["c", "d"]  # one listing per directory
    assert set(a.state.entries) == {DATASET + "c/0"}
    assert not a.disk.path_of(DATASET + "c/1").exists()
    assert net.index.owner(key_digest(DATASET + "c/0")) == A  # others are sent here now
    assert await a.get(DATASET + "c/0", Source(b"never read")) == b"o" * 10
    fresh = Source(b"new")
    assert await a.get(DATASET + "c/1", fresh) == b"new" and fresh.reads == 1


async def test_revalidation_keeps_unchanged_objects_and_drops_changed_ones(
    net, clock, tmp_path, monkeypatch
):
    a = await net.worker(A, tmp_path / "a", clock, revalidate_after=10.0)
    await a.settle(DATASET, "the source store", "the dataset")  # a task read the dataset here
    read_at = clock()
    for key in ("c/0", "c/1"):
        await a.get(DATASET + key, Source(b"v1"))
    margin = a.settings.clock_margin
    fake_source(
        monkeypatch,
        lambda store, directory: _listing(
            {"0": SourceObject(2, read_at - margin - 1), "1": SourceObject(2, read_at + 3)}
        ),
    )
    clock.now += 9
    await a.flush()
    await a.upkeep.idle()  # nothing due yet
    assert a.counters.revalidated == 0
    clock.now += 2  # due: checked at the next flush, served meanwhile
    assert await a.get(DATASET + "c/0", Source(b"never read")) == b"v1"
    await a.flush()
    await a.upkeep.idle()
    assert (a.counters.revalidated, a.counters.revalidate_dropped) == (1, 1)
    clock.now += 9  # vouched for 9 s ago, read 20 s ago: still served
    assert await a.get(DATASET + "c/0", Source(b"never read")) == b"v1"
    fresh = Source(b"v2")
    assert await a.get(DATASET + "c/1", fresh) == b"v2" and fresh.reads == 1


async def test_an_object_whose_check_is_late_is_not_served(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock, revalidate_after=10.0)
    await a.get(DATASET + "c/0", Source(b"v1"))  # no task read the dataset: no store to list
    clock.now += 10 + a.settings.revalidate_grace + 1
    fresh = Source(b"v2")
    assert await a.get(DATASET + "c/0", fresh) == b"v2" and fresh.reads == 1


async def _listing(objects):
    return objects


async def test_a_write_during_the_check_is_never_undone(clock, tmp_path, monkeypatch):
    net, a = await _from_an_earlier_cluster(clock, tmp_path, {"c/0": 10})
    listed, release = asyncio.Event(), asyncio.Event()

    async def list_directory(store, directory):
        listed.set()
        await release.wait()
        return {"0": SourceObject(10, 0.0)}  # what the source held before the write

    fake_source(monkeypatch, list_directory)
    check = asyncio.ensure_future(a.zarr_cache_apply_prove(DATASET, dumps(None)))
    await listed.wait()
    await net.write([DATASET + "c/0"])
    release.set()
    await check
    assert DATASET + "c/0" not in a.state.entries
    assert await a.get(DATASET + "c/0", Source(b"written")) == b"written"


async def test_a_full_disk_pauses_caching_and_it_comes_back(net, clock, tmp_path, monkeypatch):
    a = await net.worker(A, tmp_path / "a", clock)
    real_write = a.disk.write

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(a.disk, "write", full)
    assert await a.get(K, Source()) == b"bytes"
    assert a.counters.caching_disabled == 1 and a.counters.disk_errors == 1
    monkeypatch.setattr(a.disk, "write", real_write)  # space freed
    assert await a.get("ns\x00x", Source()) == b"bytes"
    assert "ns\x00x" not in a.state.entries  # still paused: no write tried
    clock.now += 6
    assert await a.get("ns\x00y", Source()) == b"bytes"
    assert "ns\x00y" in a.state.entries and a.counters.caching_disabled == 0


async def test_one_unwritable_object_costs_that_object_only(net, clock, tmp_path, monkeypatch):
    a = await net.worker(A, tmp_path / "a", clock)
    real_write = a.disk.write

    def picky(key, *args):
        if key == K:
            raise OSError(errno.EFBIG, "File too large")
        return real_write(key, *args)

    monkeypatch.setattr(a.disk, "write", picky)
    assert await a.get(K, Source()) == b"bytes"
    assert await a.get("ns\x00fine", Source()) == b"bytes"
    assert a.counters.caching_disabled == 0 and "ns\x00fine" in a.state.entries


async def test_commit_rejections_drop_only_that_copy(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    await a.get(K, Source())
    await net.idle()
    entry = a.state.entries[K]
    await a._commit(entry.item(K)._replace(tag=entry.tag + 1000))  # a stale report
    assert K in a.state.entries


async def test_register_reports_only_verified_files(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    await a.get(K, Source())
    await net.idle()
    net.index.remove_worker(A)
    a.index.reset()
    await a.flush()
    assert net.index.owner(key_digest(K)) == A


async def test_concurrent_misses_share_one_index_call(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    keys = [f"ns\x00data.zarr/c/{i}" for i in range(20)]
    values = await asyncio.gather(*(a.get(k, Source(k.encode())) for k in keys))
    assert values == [k.encode() for k in keys]
    await net.idle()
    assert [n for n, _ in net.exchanges if n] == [20]  # one message for the 20 misses
    assert sum(c for _, c in net.exchanges) == 20
    assert all(net.index.owner(key_digest(k)) == A for k in keys)


async def test_a_cancelled_miss_gives_its_claim_back(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    task = asyncio.ensure_future(a.index.acquire_one(K))
    await asyncio.sleep(0)  # queued in the batch, not yet sent
    task.cancel()
    await asyncio.sleep(0.01)
    assert net.index.pending_count == 0


async def test_a_closing_worker_neither_calls_out_nor_waits_for_loads(net, clock, tmp_path):
    # At cluster shutdown the scheduler and the index's host may be gone already: a close
    # that flushed or waited for loads waited out the connect timeout, and the nanny
    # killed the worker process ("still alive after 4.0 seconds").
    a = await net.worker(A, tmp_path / "a", clock)
    await a.get(K, Source())
    stuck = Source()
    stuck.gate = asyncio.Event()  # a load that will not end (a peer that is gone)
    load = asyncio.ensure_future(a.get("ns\x00data.zarr/c/1", stuck))
    await stuck.reached.wait()
    net.scheduler.reachable = False
    net.hung.add(INDEX)
    calls = len(net.calls)
    await asyncio.wait_for(a.close(finish_loads=False), 0.5)
    assert len(net.calls) == calls
    net.scheduler.reachable = True
    net.hung.clear()
    a2 = await net.worker(A, tmp_path / "a", clock)  # the directory was released
    assert set(a2.state.entries) == {K}
    stuck.gate.set()
    assert await load == b"bytes"


async def peer_holds(net, clock, tmp_path):
    """a holds K (fetched from the source), b read K from a once (b's hint names a)."""
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    await a.get(K, Source(b"old"))
    await net.idle()  # the commit
    assert await b.get(K, Source(b"never")) == b"old" and b.counters.peer_reads == 1
    return a, b


async def test_a_peer_behind_on_writes_is_never_believed(net, clock, tmp_path):
    # The write reaches b, not yet a (a slow link); a read on b starts a fetch, asks a
    # by its hint, and a still serves what the write replaced: b must refuse those bytes.
    a, b = await peer_holds(net, clock, tmp_path)
    seq = await net.write([K], late={A})
    new = Source(b"new")
    assert await b.get(K, new) == b"new" and new.reads == 1
    assert b.counters.stale_refused >= 1
    await net.push(A, seq)
    assert K not in a.state.entries  # a dropped its copy; b holds the new bytes now
    assert bytes(await a.get(K, Source(b"never"))) == b"new"


async def test_a_peer_behind_on_another_key_is_believed(net, clock, tmp_path):
    # Only writes of the key itself count: a write elsewhere does not cost peer reads.
    _a, b = await peer_holds(net, clock, tmp_path)
    await net.write(["ns\x00data.zarr/c/9"], late={A})
    assert await b.get(K, Source(b"never")) == b"old"
    assert b.counters.stale_refused == 0 and b.counters.peer_reads == 2


async def test_a_prefix_write_counts_for_every_key_below_it(net, clock, tmp_path):
    _a, b = await peer_holds(net, clock, tmp_path)
    await net.write(prefixes=["ns\x00data.zarr/"], late={A})
    assert await b.get(K, Source(b"new")) == b"new" and b.counters.stale_refused >= 1


async def test_a_peer_that_answers_none_is_treated_as_missing(net, clock, tmp_path):
    _a, b = await peer_holds(net, clock, tmp_path)
    net.handlerless.add(A)  # a restarted under the same address, handlers not there yet
    b.state.remove([K])
    source = Source(b"fresh")
    assert await b.get(K, source) in (b"old", b"fresh")  # never an AttributeError


async def test_a_departed_index_host_fails_the_waiting_reads_at_once(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    net.hung.add(INDEX)  # dead: connecting would be retried until the connect timeout
    reads = [asyncio.ensure_future(a.get(f"ns\x00d/{i}", Source())) for i in range(5)]
    await net.stuck(1)  # the first exchange hangs: the reads wait behind it
    assert not any(r.done() for r in reads)
    await a.zarr_cache_worker_left(INDEX)  # the scheduler noticed at once and said so
    done, _ = await asyncio.wait(reads, timeout=0.5)
    assert len(done) == 5 and all(r.result() == b"bytes" for r in reads)


async def test_a_departed_peer_fails_the_waiting_reads_at_once(net, clock, tmp_path):
    _a, b = await peer_holds(net, clock, tmp_path)
    b.state.remove([K])
    net.hung.add(A)
    read = asyncio.ensure_future(b.get(K, Source(b"from source")))
    await net.stuck(1)
    assert not read.done()
    await b.zarr_cache_worker_left(A)
    assert await asyncio.wait_for(read, 0.5) == b"from source"


async def test_a_thawed_peer_is_asked_again_not_taken_over(net, clock, tmp_path):
    # a froze and b gave up on it once (back-off); thawed, a still holds other keys: b's
    # next read of one asks a briefly, gets it, and a keeps its entry (no second GET).
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock, read_timeout=0.2)
    other = "ns\x00data.zarr/c/7"
    await a.get(K, Source(b"k"))
    await a.get(other, Source(b"other"))
    await net.idle()
    net.hung.add(A)
    assert await b.get(K, Source(b"from source")) == b"from source"  # a timed out
    net.hung.discard(A)
    clock.now += 6.0  # a read a read-timeout later
    untouched = Source(b"never read")
    assert await b.get(other, untouched) == b"other" and untouched.reads == 0
    assert net.index.owner(key_digest(other)) == A
    assert b.state.peer_patience(A, 5.0, 0.5, 5.0) == 5.0  # its answer ended it


async def test_a_frozen_host_costs_a_read_at_most_the_read_timeout(net, clock, tmp_path):
    _a, _b = await peer_holds(net, clock, tmp_path)
    b2 = await net.worker("tcp://c:1", tmp_path / "c", clock, read_timeout=0.2)
    await b2.get(K, Source(b"never"))  # a hint naming a, like b's
    b2.state.remove([K])
    net.hung.update({A, INDEX})  # frozen: no answer, no departure notice
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await b2.get(K, Source(b"from source")) == b"from source"
    assert loop.time() - started < 0.5


async def test_a_closed_cache_ignores_the_schedulers_late_messages(net, clock, tmp_path):
    # A worker closes its cache (plugin teardown) before its connections; a scheduler's
    # message that arrives in between must not make it call out on a closed pool.
    a = await net.worker(A, tmp_path / "a", clock)
    await a.close(finish_loads=False)

    async def closed_pool(**kwargs):
        raise RuntimeError("ConnectionPool is closed")

    net.scheduler.zarr_cache_sync = closed_pool
    await a.zarr_cache_index_moved(shard=0)
    await a.flush()


async def test_peers_that_name_each_other_for_a_key_never_wait_on_each_other(net, clock, tmp_path):
    # After faults, stale hints can send A to B and B to A for the same key. A peer whose
    # own load is asking a peer answers at once: it never forwards the wait to a third
    # worker, so no cycle waits out the read timeout, and the index decides who fetches.
    a = await net.worker(A, tmp_path / "a", clock, read_timeout=3.0)
    b = await net.worker(B, tmp_path / "b", clock, read_timeout=3.0)
    a.state.hints.served(K, B)
    b.state.hints.served(K, A)
    source = Source()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.gather(a.get(K, source), b.get(K, source)) == [b"bytes"] * 2
    assert loop.time() - started < 1.0  # not the read timeout
    assert source.reads == 1


async def test_a_peer_asked_while_it_asks_the_index_waits_for_its_decision(net, clock, tmp_path):
    # The index may send A to B while B's own claim is still on its way back to B: B
    # must not answer "missing" then (A would take the claim over: two source reads).
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    decided, release = asyncio.Event(), asyncio.Event()
    acquire_one = b.index.acquire_one

    async def late_reply(*args, **kwargs):
        decision = await acquire_one(*args, **kwargs)
        decided.set()
        await release.wait()
        return decision

    b.index.acquire_one = late_reply
    source = Source()
    b_read = asyncio.ensure_future(b.get(K, source))
    await decided.wait()  # the index made B the fetcher; B does not know it yet
    a_read = asyncio.ensure_future(a.get(K, source))
    while ("tcp://b:1", "get") not in net.calls:
        await asyncio.sleep(0.001)
    release.set()
    assert await asyncio.gather(a_read, b_read) == [b"bytes"] * 2
    assert source.reads == 1


async def test_a_probe_of_a_peer_fetching_from_the_source_waits_for_its_bytes(net, clock, tmp_path):
    # B failed once (a reader gave up on it); its back-off has passed, so a reader probes
    # it for peer_probe_timeout only. B is healthy, and its source read takes longer than
    # a probe: it answers "fetching", and the reader waits for the bytes instead of taking
    # B's claim over (a second source read).
    a = await net.worker(A, tmp_path / "a", clock, peer_probe_timeout=0.05)
    b = await net.worker(B, tmp_path / "b", clock)
    slow = Source()
    slow.gate = asyncio.Event()
    b_read = asyncio.ensure_future(b.get(K, slow))
    await slow.reached.wait()
    a.state.peer_failed(B)
    clock.now += a.settings.read_timeout + 1  # past the quiet window: B is probed
    a_read = asyncio.ensure_future(a.get(K, slow))
    await asyncio.sleep(0.2)  # four probe timeouts
    slow.gate.set()
    assert await asyncio.gather(a_read, b_read) == [b"bytes"] * 2
    assert slow.reads == 1
