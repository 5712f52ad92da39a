"""The worker's catch-up with the write history (``writes/catch_up.py``), on a real LocalState.

End to end, with pushes and late messages, in ``tests/worker/test_cache.py``.
"""

from __future__ import annotations

from dask_zarr_cache.core.protocol import SyncReply, pack
from dask_zarr_cache.worker.disk import CacheFile
from dask_zarr_cache.worker.entries import LocalEntry
from dask_zarr_cache.worker.state import LocalState
from dask_zarr_cache.writes.catch_up import catch_up
from tests.fakes import FakeClock

K = "ns\x00data.zarr/c/0"


class Scheduler:
    """Answers every catch-up with ``reply``; records the requests."""

    def __init__(self, reply: SyncReply) -> None:
        self.reply = reply
        self.requests: list[dict[str, object]] = []

    async def zarr_cache_sync(self, **request: object) -> bytes:
        self.requests.append(request)
        return pack(tuple(self.reply))


def cached(state: LocalState, key: str) -> None:
    fetch, _ = state.begin_fetch(key)
    state.admit(key, LocalEntry(3, 1, 0.0), fetch)
    state.end_fetch(key, fetch)


async def test_a_catch_up_applies_each_write_once_and_renews_the_lease():
    clock = FakeClock(100.0)
    state = LocalState(None, lease=10.0, clock=clock, capacity=1_000)
    scheduler = Scheduler(SyncReply(b"e", 2, [(1, [K], []), (2, ["ns\x00other"], [])]))
    assert await catch_up(scheduler, "tcp://w:1", state, 5.0, clock) == []
    assert scheduler.requests == [
        {"worker": "tcp://w:1", "epoch": None, "seq": 0, "found_files": False}
    ]
    assert state.position() == (b"e", 2) and state.can_serve()
    cached(state, K)  # read after write 1
    assert await catch_up(scheduler, "tcp://w:1", state, 5.0, clock) == []  # again
    assert K in state.entries
    clock.now += 11
    assert not state.can_serve()  # the lease runs from the request, and ran out


async def test_another_scheduler_s_history_distrusts_every_file():
    state = LocalState(None, lease=10.0, capacity=1_000)
    await catch_up(Scheduler(SyncReply(b"e", 0, [])), "w", state, 5.0, lambda: 0.0)
    cached(state, K)
    doomed = await catch_up(Scheduler(SyncReply(b"f", 7, [])), "w", state, 5.0, lambda: 0.0)
    assert doomed == [K] and state.position() == (b"f", 7)


async def test_files_found_at_start_serve_only_as_the_history_says():
    state = LocalState(None, lease=10.0, capacity=1_000)
    current = CacheFile("ns\x00a", 3, 1, b"e", 1, mtime=1.0)
    replaced = CacheFile("ns\x00b", 3, 1, b"e", 1, mtime=1.0)
    foreign = CacheFile("ns\x00c", 3, 1, b"x", 1, mtime=1.0)
    state.found([current, replaced, foreign])
    scheduler = Scheduler(SyncReply(b"e", 2, [(2, ["ns\x00b"], [])]))
    doomed = await catch_up(scheduler, "w", state, 5.0, lambda: 0.0)
    assert scheduler.requests[0]["found_files"] is True
    assert doomed == ["ns\x00b"]
    assert state.lookup("ns\x00a")[0] is not None  # served
    assert state.lookup("ns\x00c") == (None, False)  # waits for a check of its source
    assert not state.has_unverified()
