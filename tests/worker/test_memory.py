"""Small objects' copies in memory: a hit without a file read, never outliving its entry."""

from __future__ import annotations

import pytest

from dask_zarr_cache.worker.memory import MemoryCopies
from tests.fakes import FakeNetwork, Source

A, B = "tcp://a:1", "tcp://b:1"
KEYS = [f"ns\x00data.zarr/c/{i}" for i in range(40)]
K = KEYS[0]
MEMORY = {"max_size": 1 << 20, "memory_size": 10 * 1024, "memory_object_limit": 1024}


def test_copies_stay_within_their_budget_least_recently_used_out_first():
    copies = MemoryCopies(budget=3000, object_limit=1000)
    for i in range(10):  # a scan over 10 KB through a 3 KB budget
        copies.put(f"k{i}", i, b"x" * 1000)
        assert copies.nbytes <= 3000
    assert [copies.get(f"k{i}", i) is not None for i in range(10)] == [False] * 7 + [True] * 3
    copies.get("k7", 7)  # now the most recently used
    copies.put("k10", 10, b"x" * 1000)
    assert copies.get("k7", 7) is not None and copies.get("k8", 8) is None
    copies.put("big", 11, b"x" * 1001)  # over the object limit: not kept
    assert copies.get("big", 11) is None and copies.nbytes == 3000
    assert copies.get("k7", 99) is None  # another entry's tag: not served
    copies.drop("k7")
    assert copies.get("k7", 7) is None and copies.nbytes == 2000


@pytest.fixture
def reads(monkeypatch):
    """File reads of the caches' disks, counted."""
    from dask_zarr_cache.worker.disk import DiskCache

    counted = []
    read = DiskCache.read

    def counting(self, key, expected_checksum=None):
        counted.append(key)
        return read(self, key, expected_checksum)

    monkeypatch.setattr(DiskCache, "read", counting)
    return counted


async def test_a_hit_on_a_small_object_reads_no_file(clock, tmp_path, reads):
    net = FakeNetwork()
    a = await net.worker(A, tmp_path / "a", clock, **MEMORY)
    source = Source(b"small")
    assert await a.get(K, source) == b"small"  # fetched: the bytes written are kept too
    assert await a.get(K, source) == b"small"
    assert source.reads == 1 and reads == []
    assert (a.counters.hits, a.counters.memory_hits, a.counters.memory_hit_bytes) == (1, 1, 5)
    large = "ns\x00data.zarr/c/large"
    await a.get(large, Source(b"x" * 2048))  # over the object limit: from its file
    assert await a.get(large, Source(b"never")) == b"x" * 2048 and reads == [large]


async def test_a_copy_goes_with_its_entry_write_eviction_expiry(clock, tmp_path):
    net = FakeNetwork(max_age_seconds=60)
    a = await net.worker(A, tmp_path / "a", clock, max_age_seconds=60, **MEMORY)
    await a.get(K, Source(b"old"))
    await net.write([K])  # a write: the next read is the source's new bytes
    new = Source(b"new")
    assert await a.get(K, new) == b"new" and new.reads == 1
    assert await a.get(K, Source(b"never")) == b"new"
    clock.now += 61  # past the TTL: the copy is not served either
    newest = Source(b"newest")
    assert await a.get(K, newest) == b"newest" and newest.reads == 1
    await net.evict(prefixes=["ns\x00data.zarr/"])
    assert a.state.entries.memory.nbytes == 0 and len(a.state.entries.memory) == 0


async def test_memory_stays_within_its_budget_under_a_scan_bigger_than_it(clock, tmp_path):
    net = FakeNetwork()
    a = await net.worker(A, tmp_path / "a", clock, **MEMORY)
    for key in KEYS:  # 40 KB of 1 KB objects through a 10 KB memory budget, twice
        await a.get(key, Source(b"x" * 1000))
    for key in KEYS:
        assert await a.get(key, Source(b"never")) == b"x" * 1000
        assert a.state.entries.memory.nbytes <= MEMORY["memory_size"]
    assert a.counters.hits == len(KEYS) and a.counters.entries == len(KEYS)  # all on disk


async def test_a_peer_is_served_from_memory_and_a_copy_is_kept_after_a_file_read(
    clock, tmp_path, reads
):
    net = FakeNetwork()
    a = await net.worker(A, tmp_path / "a", clock, **MEMORY)
    b = await net.worker(B, tmp_path / "b", clock, **MEMORY)
    await a.get(K, Source(b"small"))
    await net.idle()
    assert await b.get(K, Source(b"never")) == b"small"  # a served it from memory
    assert reads == [] and a.counters.peer_served == 1
    a.state.entries.memory.drop(K)  # as if pushed out by others
    assert await b.get("ns\x00data.zarr/c/1", Source(b"b's")) == b"b's"
    await a.get(K, Source(b"never"))  # a file read, then kept in memory again
    await a.get(K, Source(b"never"))
    assert reads == [K] and a.counters.memory_hits == 1
