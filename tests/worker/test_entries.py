"""A worker's entries: which are due for a check against their source, in vouched order."""

from __future__ import annotations

from dataclasses import replace

from dask_zarr_cache.worker.budget import Budget
from dask_zarr_cache.worker.counters import CacheCounters
from dask_zarr_cache.worker.entries import Entries, LocalEntry
from tests.fakes import FakeClock


def entries(clock: FakeClock) -> Entries:
    return Entries(None, clock, Budget(1 << 40), CacheCounters(), revalidate_after=10.0)


def test_due_are_the_entries_vouched_for_longest_ago_and_a_check_moves_one_back():
    clock = FakeClock(0.0)
    found = entries(clock)
    for i in range(5):
        clock.now = float(i)
        found.add(f"ns\x00k{i}", LocalEntry(1, 0, clock.now))
    found.add("ns\x00waiting", LocalEntry(1, 0, 0.0, proven=False))  # not served: no check
    clock.now = 12.0
    assert list(found.due()) == ["ns\x00k0", "ns\x00k1", "ns\x00k2"]
    found.add("ns\x00k0", replace(found["ns\x00k0"], checked_at=12.0))  # checked now
    assert list(found.due()) == ["ns\x00k1", "ns\x00k2"]
    found.remove(["ns\x00k1"])
    clock.now = 22.0
    assert list(found.due()) == ["ns\x00k2", "ns\x00k3", "ns\x00k4", "ns\x00k0"]


def test_finding_the_due_entries_looks_at_them_and_one_more(monkeypatch):
    clock = FakeClock(0.0)
    found = entries(clock)
    for i in range(10_000):
        clock.now = i / 1000
        found.add(f"ns\x00k{i}", LocalEntry(1, 0, clock.now))
    clock.now = 10.0035  # k0..k3 are 10 s old or more
    looked = []
    vouched_at = LocalEntry.vouched_at
    monkeypatch.setattr(LocalEntry, "vouched_at", lambda e: looked.append(e) or vouched_at(e))
    assert len(found.due()) == 4
    assert len(looked) == 5  # not the 10,000 on every flush


def test_a_check_keeps_an_entrys_place_in_the_ttl_sweep():
    clock = FakeClock(0.0)
    found = Entries(5.0, clock, Budget(1 << 40), CacheCounters(), revalidate_after=10.0)
    for i in range(3):
        clock.now = float(i)
        found.add(f"ns\x00k{i}", LocalEntry(1, 0, clock.now))
    found.add("ns\x00k0", replace(found["ns\x00k0"], checked_at=2.0))  # vouched again
    clock.now = 6.5
    assert found.expired() == ["ns\x00k0", "ns\x00k1"]  # k0 is as old as it was


def test_without_revalidation_nothing_is_kept_in_vouched_order():
    clock = FakeClock(0.0)
    found = Entries(None, clock, Budget(1 << 40), CacheCounters())
    found.add("ns\x00k0", LocalEntry(1, 0, 0.0))
    clock.now = 1e9
    assert found.due() == {}
    assert not found._vouched
