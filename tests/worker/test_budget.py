"""A worker's budget: LRU order, TinyLFU admission, the byte limit."""

from __future__ import annotations

import pytest

from dask_zarr_cache.worker.budget import Budget


def filled(keys, size=10, capacity=30, policy="lru") -> Budget:
    budget = Budget(capacity, policy)
    for key in keys:
        assert budget.admit(key, size) == []
    return budget


def test_eviction_follows_last_access_here_or_by_peers():
    budget = filled(["k0", "k1", "k2"])
    budget.touch("k0")  # a local hit or a read served to a peer
    assert budget.admit("k3", 10) == ["k1"]
    assert budget.lru_keys() == ["k2", "k0", "k3"] and budget.used == 30


def test_objects_over_the_budget_are_evicted_until_it_fits():
    budget = filled(["k0", "k1", "k2"])
    assert budget.admit("big", 25) == ["k0", "k1", "k2"]
    assert budget.used == 25 and budget.lru_keys() == ["big"]
    assert budget.admit("huge", 40) == ["big", "huge"]  # bigger than the whole budget
    assert budget.used == 0


def test_found_files_over_the_budget_go_oldest_first():
    budget = Budget(25)
    assert [budget.add(k, 10) for k in ("a", "b", "c")] == [[], [], ["a"]]
    assert budget.lru_keys() == ["b", "c"] and budget.used == 20


def test_tinylfu_keeps_what_is_read_again_and_turns_away_a_one_off_read():
    budget = filled(["hot0", "hot1"], capacity=20, policy="tinylfu")
    assert budget.policy == "tinylfu"
    budget.touch("hot0")
    budget.touch("hot1")
    budget.record("once")
    assert budget.admit("once", 10) == ["once"]  # read once: it leaves, not a hot key
    assert budget.lru_keys() == ["hot0", "hot1"] and "once" not in budget
    # The cluster asked for it again and again (the index's count comes with a fetch).
    budget.record("once", reads=5)
    assert budget.admit("once", 10) == ["hot0"]
    assert budget.lru_keys() == ["hot1", "once"] and budget.used == 20


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_removed_keys_free_their_bytes(policy):
    budget = filled(["a", "b"], capacity=20, policy=policy)
    budget.remove("a")
    budget.remove("never there")
    assert budget.used == 10 and budget.admit("c", 10) == []


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
