"""One index shard's logic, without a cluster: ownership, single fetch, TTL, registration."""

from __future__ import annotations

import pytest

from dask_zarr_cache.core.protocol import FETCH, PEER, PENDING, Decision, Item, pack, unpack
from dask_zarr_cache.identity.keys import IMMUTABLE
from dask_zarr_cache.index.digests import key_digest
from dask_zarr_cache.index.shard import CacheIndex
from tests.fakes import FakeClock


def d(*keys: str) -> list[int]:
    return [key_digest(k) for k in keys]


def fill(index: CacheIndex, worker: str, keys, tag=0) -> None:
    assert [x.kind for x in index.acquire(worker, d(*keys))] == [FETCH] * len(keys)
    assert index.commit(worker, [(x, tag) for x in d(*keys)]) == []


def test_first_asker_fetches_others_wait_then_read_from_the_owner():
    index = CacheIndex()
    (k,) = d("k")
    assert index.acquire("A", [k]) == [Decision(FETCH, "A", 1)]  # the cluster asked once
    (waiting,) = index.acquire("B", [k])
    assert waiting[:2] == (PENDING, "A") and waiting.claim > 0
    assert index.acquire("C", [k]) == [waiting]
    assert index.commit("A", [(k, 0)]) == []
    assert index.acquire("B", [k]) == [Decision(PEER, "A")]
    assert index.owner(k) == "A" and k in index
    assert index.workers()["A"] == {"entries": 1}


def test_a_fetch_decision_carries_the_clusters_count_of_misses():
    index = CacheIndex()
    (k,) = d("k")
    for _ in range(3):
        index.acquire("B", [k])
        index.abandon("B", [k])
    assert index.acquire("A", [k]) == [Decision(FETCH, "A", 4)]
    assert CacheIndex(policy="lru").acquire("A", [k]) == [Decision(FETCH, "A", 0)]


def test_abandoned_fetch_lets_the_next_asker_fetch():
    index = CacheIndex()
    index.acquire("A", d("k"))
    index.abandon("A", d("k"))
    assert index.acquire("B", d("k"))[0][:2] == (FETCH, "B")


def test_owner_that_lost_its_file_fetches_again():
    index = CacheIndex()
    fill(index, "A", ["k"])
    assert index.acquire("A", d("k"))[0][:2] == (FETCH, "A")
    assert index.workers()["A"]["entries"] == 0


def test_an_unreachable_holder_loses_its_entry_and_claim_once():
    index = CacheIndex()
    fill(index, "A", ["k0"])
    index.acquire("C", d("k1"))
    decisions = index.acquire("B", d("k0", "k1"), unreachable=("X", 0))
    assert [x[:2] for x in decisions] == [(PEER, "A"), (PENDING, "C")]  # X holds neither
    decisions = index.acquire("B", d("k0", "k1"), unreachable=("C", decisions[1].claim))
    assert [x[:2] for x in decisions] == [(PEER, "A"), (FETCH, "B")]
    decisions = index.acquire("B", d("k0"), unreachable=("A", 0))
    assert decisions[0][:2] == (FETCH, "B")
    assert index.acquire("D", d("k0"))[0][:2] == (PENDING, "B")


def test_a_claim_renewed_since_the_asker_saw_it_is_not_taken_over():
    # X's claim was stale (an acquire its worker gave up on), so X answered "missing";
    # meanwhile X started reading the key and renewed the claim: it fetches now, and B
    # is sent back to it instead of fetching too (which would read the source twice).
    index = CacheIndex()
    (k,) = d("k")
    index.acquire("X", [k])
    (seen,) = index.acquire("B", [k])
    assert index.acquire("X", [k])[0][:2] == (FETCH, "X")  # its own claim, renewed
    (again,) = index.acquire("B", [k], unreachable=("X", seen.claim))
    assert again[:2] == (PENDING, "X") and again.claim != seen.claim
    (taken,) = index.acquire("B", [k], unreachable=("X", again.claim))  # X failed again
    assert taken[:2] == (FETCH, "B")


def test_an_owner_that_fetches_again_keeps_its_claim_when_a_reader_found_its_copy_gone():
    # B was sent to A's copy; A lost the file and, reading the key itself, claimed it
    # again before B's "missing" came back: B waits for A's fetch instead of fetching too.
    index = CacheIndex()
    fill(index, "A", ["k"])
    (k,) = d("k")
    assert index.acquire("B", [k])[0][:2] == (PEER, "A")
    assert index.acquire("A", [k])[0][:2] == (FETCH, "A")  # its own entry: fetch again
    assert index.acquire("B", [k], unreachable=("A", 0))[0][:2] == (PENDING, "A")


def test_ttl_makes_entries_absent():
    clock = FakeClock(1000.0)
    index = CacheIndex(max_age_seconds=5, clock=clock)
    fill(index, "A", ["k"])
    clock.now += 4
    assert index.acquire("B", d("k")) == [Decision(PEER, "A")]
    clock.now += 2
    assert index.acquire("B", d("k"))[0][:2] == (FETCH, "B")
    assert index.workers()["A"]["entries"] == 0 and index.cached(d("k")) == [False]


def test_entries_of_immutable_data_never_expire():
    clock = FakeClock(1000.0)
    index = CacheIndex(max_age_seconds=5, clock=clock)
    snapshot = IMMUTABLE + "snap\x00a/c/0"
    fill(index, "A", [snapshot, "k"])
    clock.now += 3600
    assert index.acquire("B", d(snapshot, "k"))[0] == Decision(PEER, "A")
    assert index.acquire("B", d("k"))[0][:2] == (FETCH, "B")  # the mortal one expired


def test_invalidate_drops_entries_and_pending_claims():
    index = CacheIndex()
    fill(index, "A", ["k", "other"])
    index.acquire("B", d("in-flight"))
    assert index.invalidate(d("k", "in-flight", "never-cached")) == 1
    assert index.cached(d("k", "other")) == [False, True]
    # The in-flight fetch lost its claim: its commit is rejected, so old bytes never land.
    assert index.commit("B", [(d("in-flight")[0], 0)]) == [0]


def test_register_adopts_disk_files_and_refuses_duplicates():
    index = CacheIndex()
    fill(index, "A", ["dup"])
    index.acquire("C", d("busy"))
    files = [(x, 1) for x in d("dup", "x", "busy", "y")]
    assert index.register("B", files) == [0, 2]  # held or being fetched elsewhere
    assert index.owner(d("x")[0]) == "B" and index.workers()["B"]["entries"] == 2
    # A re-registration is authoritative: entries no longer on disk are forgotten.
    assert index.register("B", [(d("y")[0], 1)]) == []
    assert index.owner(d("x")[0]) is None and index.workers()["B"]["entries"] == 1


def test_register_in_parts_forgets_only_after_the_last():
    index = CacheIndex()
    fill(index, "B", ["a", "b", "c"])
    assert index.register("B", [(d("a")[0], 0)], first=True, last=False) == []
    assert len(index) == 3  # nothing forgotten before the last part
    index.acquire("B", d("new"))
    assert index.commit("B", [(d("new")[0], 0)]) == []  # committed meanwhile: kept
    assert index.register("B", [(d("b")[0], 0)], first=False, last=True) == []
    assert sorted(index.cached(d("a", "b", "c", "new"))) == [False, True, True, True]
    assert index.cached(d("c")) == [False] and index.workers()["B"]["entries"] == 3


def test_register_forgets_files_whose_digests_are_above_2_to_the_63():
    # numpy 2.0.0's np.isin overflowed on such uint64 digests in a narrow range (the floor
    # leg of CI: every re-registration of a worker's files failed).
    index = CacheIndex()
    high = [2**63 + 5, 2**63 + 9]
    assert index.register("B", [(h, 0) for h in high]) == []
    assert index.register("B", [(high[1], 0)]) == []
    assert index.cached(high) == [False, True] and index.workers()["B"]["entries"] == 1


def test_register_takes_over_its_own_pending_fetch():
    index = CacheIndex()
    index.acquire("A", d("k"))
    assert index.register("A", [(d("k")[0], 3)]) == []
    assert index.owner(d("k")[0]) == "A" and index.pending_count == 0


def test_add_records_more_files_and_forgets_none():
    index = CacheIndex()
    fill(index, "B", ["a", "b"])
    fill(index, "A", ["dup"])
    index.acquire("C", d("busy"))
    files = [(x, 1) for x in d("dup", "proved", "busy")]
    assert index.add("B", files) == [0, 2]  # held or being fetched elsewhere
    assert index.cached(d("a", "b", "proved")) == [True] * 3
    assert index.owner(d("proved")[0]) == "B" and index.workers()["B"]["entries"] == 3
    # Added while a registration in parts runs: the last part does not forget it.
    assert index.register("B", [(d("a")[0], 0)], first=True, last=False) == []
    assert index.add("B", [(d("late")[0], 0)]) == []
    assert index.register("B", [(d("b")[0], 0)], first=False, last=True) == []
    assert index.cached(d("a", "b", "late", "proved")) == [True, True, True, False]


def test_add_leaves_a_key_the_worker_fetches_again_to_that_fetch():
    index = CacheIndex()
    index.acquire("B", d("k"))  # B fetches k again while its old file of k is proved
    assert index.add("B", [(d("k")[0], 1)]) == []  # neither listed nor deleted
    assert index.owner(d("k")[0]) is None and index.pending_count == 1
    assert index.commit("B", [(d("k")[0], 2)]) == []  # the new copy commits
    assert index.owner(d("k")[0]) == "B"


def test_remove_worker_drops_its_entries_and_claims():
    index = CacheIndex()
    fill(index, "A", ["k0", "k1"])
    fill(index, "B", ["k3"])
    index.acquire("A", d("k2"))
    assert index.remove_worker("A") == 2
    assert [x[:2] for x in index.acquire("B", d("k0", "k2"))] == [(FETCH, "B")] * 2
    assert index.owner(d("k3")[0]) == "B" and len(index) == 1


def test_touch_from_an_unknown_worker_asks_it_to_register():
    assert CacheIndex().touch("nobody", [(1, 0)]) is False


def test_a_stale_claim_can_be_taken_over():
    clock = FakeClock(1000.0)
    index = CacheIndex(clock=clock)
    index.acquire("A", d("k"))
    clock.now += 3600
    assert index.acquire("B", d("k"))[0][:2] == (FETCH, "B")
    assert index.commit("A", [(d("k")[0], 0)]) == [0]


def test_a_late_drop_report_never_removes_a_newer_copy():
    index = CacheIndex()
    (k,) = d("k")
    fill(index, "A", ["k"], tag=1)
    # A dropped copy 1 (a write invalidated it), then fetched and committed copy 2 ...
    index.invalidate([k])
    fill(index, "A", ["k"], tag=2)
    # ... before its periodic flush reported dropping copy 1.
    assert index.touch("A", [(k, 1)]) is True
    assert index.owner(k) == "A" and index.workers()["A"]["entries"] == 1
    index.touch("A", [(k, 2)])
    assert index.owner(k) is None and index.workers()["A"]["entries"] == 0


def test_workers_leave_and_new_ones_reuse_their_numbers():
    index = CacheIndex()
    for round_ in range(3):
        for w in range(100):
            fill(index, f"w{w}", [f"{round_}/{w}"])
        assert len(index) == 100
        for w in range(100):
            index.remove_worker(f"w{w}")
        assert len(index) == 0 and index.workers() == {}


@pytest.mark.parametrize(
    "keys", [[], ["a"], ["ns\x00c/0", "ns\x00c/1\x00r0-5", "x y", "tab\there", "nl\nü", "#"]]
)
def test_wire_format_round_trips_any_key(keys):
    assert unpack(pack(keys)) == keys
    items = [Item(k, i, i + 1) for i, k in enumerate(keys)]
    assert unpack(pack(items)) == items
    assert len(set(d(*keys))) == len(keys) and 0 not in d(*keys)
