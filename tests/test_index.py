"""The index policy, without a cluster: ownership, single fetch, global LRU, TTL."""

from __future__ import annotations

import pytest

from dask_zarr_cache._index import CacheIndex
from dask_zarr_cache._protocol import FETCH, PEER, PENDING, Item, pack, unpack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fill(index: CacheIndex, worker: str, keys, size=10, capacity=100):
    assert index.acquire(worker, keys) == [(FETCH, worker)] * len(keys)
    return index.commit(worker, capacity, [(k, size, 0) for k in keys])


def test_first_asker_fetches_others_wait_then_read_from_the_owner():
    index = CacheIndex()
    assert index.acquire("A", ["k"]) == [(FETCH, "A")]
    assert index.acquire("B", ["k"]) == [(PENDING, "A")]
    assert index.acquire("C", ["k"]) == [(PENDING, "A")]
    assert index.commit("A", 100, [("k", 10, 0)]) == ([], [])
    assert index.acquire("B", ["k"]) == [(PEER, "A")]
    assert index.owner("k") == "A"
    assert index.workers()["A"] == {"capacity": 100, "used": 10, "entries": 1}


def test_abandoned_fetch_lets_the_next_asker_fetch():
    index = CacheIndex()
    index.acquire("A", ["k"])
    index.abandon("A", ["k"])
    assert index.acquire("B", ["k"]) == [(FETCH, "B")]


def test_owner_that_lost_its_file_fetches_again():
    index = CacheIndex()
    fill(index, "A", ["k"])
    assert index.acquire("A", ["k"]) == [(FETCH, "A")]
    assert index.workers()["A"]["used"] == 0


def test_eviction_follows_cluster_wide_last_access():
    index = CacheIndex(policy="lru")
    fill(index, "A", ["k0", "k1", "k2"], size=10, capacity=30)
    # k0 is read by another worker (a peer read): its owner reports the access.
    index.touch("A", ["k0"])
    evicted, rejected = index.commit("A", 30, [])
    assert (evicted, rejected) == ([], [])
    index.acquire("A", ["k3"])
    evicted, _ = index.commit("A", 30, [("k3", 10, 0)])
    assert evicted == ["k1"]  # least recently used cluster-wide; k0 was refreshed
    assert index.lru_keys("A") == ["k2", "k0", "k3"]
    assert index.workers()["A"]["used"] == 30


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_budget_is_per_worker(policy):
    index = CacheIndex(policy=policy)
    fill(index, "A", ["a0", "a1"], size=10, capacity=20)
    fill(index, "B", ["b0", "b1"], size=10, capacity=20)
    index.acquire("B", ["b2"])
    for _ in range(2):  # b2 now read more often than b0: TinyLFU admits it too
        index.touch("B", ["b2"])
    evicted, _ = index.commit("B", 20, [("b2", 10, 0)])
    assert evicted == ["b0"]
    assert index.lru_keys("A") == ["a0", "a1"]


def test_tinylfu_keeps_what_is_read_again_and_turns_away_a_one_off_read():
    index = CacheIndex()
    assert index.policy == "tinylfu"
    fill(index, "A", ["hot0", "hot1"], size=10, capacity=20)
    index.touch("A", ["hot0", "hot1"])
    index.acquire("A", ["once"])
    evicted, rejected = index.commit("A", 20, [("once", 10, 0)])
    assert (evicted, rejected) == (["once"], [])  # read once: it leaves, not a hot key
    assert index.lru_keys("A") == ["hot0", "hot1"] and "once" not in index
    assert index.workers()["A"]["used"] == 20
    # Asked for again and again (each time a miss), it becomes worth a place.
    for _ in range(3):
        index.acquire("A", ["once"])
        index.abandon("A", ["once"])
    index.acquire("A", ["once"])
    evicted, _ = index.commit("A", 20, [("once", 10, 0)])
    assert evicted == ["hot0"] and index.lru_keys("A") == ["hot1", "once"]


def test_tinylfu_holds_half_of_a_cyclic_scan_twice_the_cache_and_lru_none():
    from benchmarks._traces import scan, simulate

    capacity = 200
    cold = 2 * capacity
    for policy, low, high in (("tinylfu", 0.40, 0.50), ("lru", 0.0, 0.0)):
        hits, reads = simulate(policy, scan(capacity), capacity)
        assert low <= hits / (reads - cold) <= high, (policy, hits, reads)


def test_tinylfu_keeps_the_hot_set_through_one_off_scans():
    from benchmarks._traces import mixed, simulate

    ratio = {}
    for policy in ("tinylfu", "lru"):
        hits, reads = simulate(policy, mixed(200, 4000), 200)
        ratio[policy] = hits / reads
    assert ratio["tinylfu"] > ratio["lru"] + 0.1, ratio


def test_switching_policy_keeps_entries():
    index = CacheIndex(policy="lru")
    fill(index, "A", ["k0", "k1"], size=10, capacity=20)
    index.policy = "tinylfu"
    assert index.policy == "tinylfu" and index.lru_keys("A") == ["k0", "k1"]
    index.policy = "lru"
    index.acquire("A", ["k2"])
    assert index.commit("A", 20, [("k2", 10, 0)]).evicted == ["k0"]


def test_ttl_makes_entries_absent_and_queues_their_deletion():
    clock = Clock()
    index = CacheIndex(max_age_seconds=5, clock=clock)
    fill(index, "A", ["k"])
    clock.now += 4
    assert index.acquire("B", ["k"]) == [(PEER, "A")]
    clock.now += 2
    assert index.acquire("B", ["k"]) == [(FETCH, "B")]
    expired, known = index.touch("A", [])
    assert (expired, known) == (["k"], True)
    assert index.workers()["A"]["used"] == 0


def test_expire_all_sweeps_old_entries():
    clock = Clock()
    index = CacheIndex(max_age_seconds=5, clock=clock)
    fill(index, "A", ["k0", "k1"])
    clock.now += 10
    assert index.expire_all() == 2
    assert len(index) == 0


def test_invalidate_drops_object_ranges_and_pending_claims():
    index = CacheIndex()
    fill(index, "A", ["ns\x00k", "ns\x00k\x00r0-4", "ns/other"])
    index.acquire("B", ["ns\x00k\x00s8"])  # in flight
    dropped = index.invalidate(["ns\x00k"])
    assert sorted(dropped) == [("A", "ns\x00k"), ("A", "ns\x00k\x00r0-4")]
    assert "ns/other" in index
    # The in-flight fetch lost its claim: its commit is rejected, so old bytes never land.
    assert index.commit("B", 100, [("ns\x00k\x00s8", 4, 0)]) == ([], ["ns\x00k\x00s8"])


def test_invalidate_prefix_drops_a_directory():
    index = CacheIndex()
    fill(index, "A", ["ns/a/c/0", "ns/a/c/1", "ns/b/c/0"])
    assert len(index.invalidate([], ["ns/a/"])) == 2
    assert list(index._entries) == ["ns/b/c/0"]


def test_register_adopts_disk_files_and_refuses_duplicates_and_overflow():
    index = CacheIndex()
    fill(index, "A", ["dup"])
    to_delete = index.register("B", 25, [("dup", 10, 0), ("x", 10, 0), ("y", 10, 0), ("z", 10, 0)])
    assert to_delete == ["dup", "x"]  # held elsewhere; then the oldest over budget
    assert index.owner("y") == "B" and index.workers()["B"]["used"] == 20
    # A re-registration is authoritative: entries no longer on disk are forgotten.
    assert index.register("B", 25, [("y", 10, 0)]) == []
    assert index.owner("z") is None and index.workers()["B"]["used"] == 10


def test_remove_worker_drops_its_entries_and_claims():
    index = CacheIndex()
    fill(index, "A", ["k0", "k1"])
    index.acquire("A", ["k2"])
    assert index.remove_worker("A") == 2
    assert index.acquire("B", ["k0", "k2"]) == [(FETCH, "B"), (FETCH, "B")]


def test_touch_from_an_unknown_worker_asks_it_to_register():
    assert CacheIndex().touch("nobody", ["k"]) == ([], False)


def test_a_stale_claim_can_be_taken_over():
    clock = Clock()
    index = CacheIndex(clock=clock)
    index.acquire("A", ["k"])
    clock.now += 3600
    assert index.acquire("B", ["k"]) == [(FETCH, "B")]
    assert index.commit("A", 100, [("k", 1, 0)]) == ([], ["k"])


@pytest.mark.parametrize(
    "keys", [[], ["a"], ["ns\x00c/0", "ns\x00c/1\x00r0-5", "x y", "tab\there", "nl\nü", "#"]]
)
def test_wire_format_round_trips_any_key(keys):
    assert unpack(pack(keys)) == keys
    items = [Item(k, i, i + 1) for i, k in enumerate(keys)]
    assert unpack(pack(items)) == items


def test_a_late_drop_report_never_removes_a_newer_copy():
    index = CacheIndex()
    index.acquire("A", ["k"])
    index.commit("A", 100, [("k", 10, 1)])
    # A dropped copy 1 (a write invalidated it), then fetched and committed copy 2 ...
    index.invalidate(["k"])
    index.acquire("A", ["k"])
    index.commit("A", 100, [("k", 10, 2)])
    # ... before its periodic flush reported dropping copy 1.
    index.touch("A", [], dropped=[("k", 10, 1)])
    assert index.owner("k") == "A" and index.workers()["A"]["used"] == 10
    index.touch("A", [], dropped=[("k", 10, 2)])
    assert index.owner("k") is None and index.workers()["A"]["used"] == 0
