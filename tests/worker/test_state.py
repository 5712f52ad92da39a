"""A worker's bookkeeping under one lock: what spans its parts happens in one step."""

from __future__ import annotations

import threading
import time

from dask_zarr_cache.worker.entries import LocalEntry
from dask_zarr_cache.worker.state import LocalState
from tests.fakes import FakeClock

K = "ns\x00data.zarr/c/0"
A = "tcp://a:1"


class OtherThreadBetweenHolds:
    """A lock that lets "another thread" act the first time it is released.

    What runs in ``between`` is exactly what another thread could do in the window where
    the lock is free; a method that must act in one hold gives it no such window.
    """

    def __init__(self, between) -> None:
        self._lock = threading.Lock()
        self._between = between

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)
        between, self._between = self._between, None
        if between is not None:
            between()


def test_removing_an_old_copy_never_removes_a_newer_one_admitted_meanwhile():
    state = LocalState(None, lease=10.0, capacity=1_000)
    old = LocalEntry(3, 1, 0.0)
    state.adopt([])
    fetch, _ = state.begin_fetch(K)
    state.admit(K, old, fetch)
    state.end_fetch(K, fetch)
    newer = LocalEntry(3, 2, 1.0)

    def admit_newer() -> None:  # another thread's fetch completes in the window
        refetch, _ = state.begin_fetch(K)
        state.admit(K, newer, refetch)
        state.end_fetch(K, refetch)

    state.lock = OtherThreadBetweenHolds(admit_newer)
    state.remove_copy(K, old.tag)  # the old copy's file was found damaged
    assert state.entries[K] is newer


def test_a_write_poisons_the_load_and_drops_the_entry_in_one_step():
    state = LocalState(None, lease=10.0, capacity=1_000)
    fetch, leader = state.begin_fetch(K)
    assert leader
    state.apply_write(b"e", 1, [K], [])
    stays, doomed = state.admit(K, LocalEntry(3, 1, 0.0), fetch)
    assert not stays and doomed == [K] and K not in state.entries
    assert state.inflight(K) is None  # readers that start now do not join it


def test_a_write_applied_already_spares_the_loads_and_files_begun_since():
    state = LocalState(None, lease=10.0, capacity=1_000)
    state.synced(b"e", 0, 0.0)
    assert state.apply_write(b"e", 1, [K], []) == []  # a catch-up brought write 1
    fetch, _ = state.begin_fetch(K)  # reads the source after write 1 reached it
    assert state.apply_write(b"e", 1, [K], []) == []  # the late push of write 1
    assert not fetch.poisoned and state.inflight(K) is fetch
    assert state.admit(K, LocalEntry(3, 1, 0.0), fetch) == (True, [])
    assert state.evict(b"e", 1, [K], []) == ([], 0, 0)  # write 1 dropped nothing here
    assert state.apply_write(b"other", 1, [K], []) == [K]  # another history's write 1
    assert K not in state.entries


def test_an_eviction_a_catch_up_applied_first_still_reports_what_it_dropped():
    state = LocalState(None, lease=10.0, capacity=1_000)
    state.synced(b"e", 0, 0.0)
    fetch, _ = state.begin_fetch(K)
    state.admit(K, LocalEntry(3, 1, 0.0), fetch)
    assert state.apply_write(b"e", 1, [], ["ns"]) == [K]  # the catch-up brings eviction 1
    assert state.evict(b"e", 1, [], ["ns"]) == ([], 1, 3)  # its push: nothing left to drop


def test_a_slow_probe_of_a_peer_in_back_off_does_not_restart_its_quiet_window():
    # Chaos seed 3025: one probe answered 0.49 s late (limit 0.5 s) made every read skip
    # the peer unasked for 5 s, reporting it unreachable: 15 of its chunks fetched again.
    clock = FakeClock()
    state = LocalState(None, 10.0, clock, capacity=1000, peer_backoff=30.0)
    state.peer_failed(A)
    clock.now += 9.5
    assert state.peer_patience(A, 5.0, 0.5, 5.0) == 0.5  # in back-off: probed
    state.peer_failed(A, probe=True)  # the probe's answer came too late
    clock.now += 0.3
    assert state.peer_patience(A, 5.0, 0.5, 5.0) == 0.5  # the next read probes it too
    state.peer_failed(A)  # a full wait that failed does restart it
    assert state.peer_patience(A, 5.0, 0.5, 5.0) == 0


def test_a_reply_handled_after_the_departure_notice_does_not_bring_the_peer_back():
    clock = FakeClock()
    state = LocalState(None, 10.0, clock, capacity=1000, peer_backoff=30.0)
    state.peer_left(A)
    state.peer_answered(A)  # its reply, sent before it died, handled after the notice
    state.served_by(K, A, 5)
    assert state.owner_hint(K) is None
    clock.now += 60.0
    assert state.peer_patience(A, 5.0, 0.5, 5.0) == 0


def test_counters_are_read_and_updated_under_the_lock():
    state = LocalState(None, lease=10.0)
    threads = [threading.Thread(target=lambda: [state.count(hits=1) for _ in range(10_000)])]
    threads += [
        threading.Thread(target=lambda: [state.gauge(caching_disabled=1) for _ in range(100)])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.counts()["hits"] == 10_000 and state.counts()["caching_disabled"] == 1


def test_a_peer_in_back_off_is_asked_briefly_and_its_first_answer_ends_it():
    clock = FakeClock()
    state = LocalState(None, 10.0, clock, capacity=1000, peer_backoff=30.0)

    def patience(peer: str) -> float:  # for a read that starts now
        return state.peer_patience(peer, 5.0, 0.5, 5.0)

    assert patience("tcp://p:1") == 5.0
    state.peer_failed("tcp://p:1")
    assert patience("tcp://p:1") == 0  # failed during this very read
    clock.now += 1.0
    assert patience("tcp://p:1") == 0  # failed a moment ago: one timeout, not one per read
    clock.now += 5.0
    assert patience("tcp://p:1") == 0.5  # in back-off since longer: asked briefly
    state.peer_answered("tcp://p:1")  # it was only frozen for a while
    assert patience("tcp://p:1") == 5.0
    state.peer_failed("tcp://p:1")
    clock.now += 30.0
    assert patience("tcp://p:1") == 5.0  # the back-off ran out
    state.peer_left("tcp://gone:1")
    clock.now += 1.0
    assert patience("tcp://gone:1") == 0  # a peer that left is not asked


def test_overlapping_reads_sum_their_time_and_count_their_span_once():
    state = LocalState(None, lease=10.0)
    first, second = state.reading(), state.reading()
    first.__enter__()
    time.sleep(0.05)
    second.__enter__()  # 50 ms later
    time.sleep(0.05)
    first.__exit__(None, None, None)
    time.sleep(0.05)
    second.__exit__(None, None, None)
    counts = state.counts()
    # Summed: 100 ms + 100 ms; spanned: the 150 ms with at least one read in flight.
    assert counts["read_us"] >= 200_000
    assert 150_000 <= counts["read_busy_us"] <= counts["read_us"] - 40_000
