"""Asking a peer for an object: who is blamed when the answer does not come in time."""

from __future__ import annotations

import asyncio

from dask_zarr_cache.core.loops import WorkerLoop
from dask_zarr_cache.worker.disk import DiskCache
from dask_zarr_cache.worker.peers import MISSING, Peers
from dask_zarr_cache.worker.state import LocalState
from tests.fakes import FakeClock

PEER = "tcp://peer:1"
READ_TIMEOUT = 5.0


class _SilentPeer:
    """A peer whose answer does not come within the timeout; ``stood_still`` seconds pass."""

    def __init__(self, clock: FakeClock, stood_still: float) -> None:
        self.clock, self.stood_still = clock, stood_still

    def __call__(self, address: str) -> _SilentPeer:
        return self

    async def zarr_cache_get(self, key: str, probe: bool) -> None:
        self.clock.now += self.stood_still
        raise TimeoutError


async def _ask(tmp_path, stood_still: float) -> LocalState:
    clock = FakeClock()
    state = LocalState(None, 10.0, clock)
    loop = WorkerLoop(asyncio.get_running_loop())
    peers = Peers(
        state, DiskCache(tmp_path), _SilentPeer(clock, stood_still), loop, 5.0, clock, 1.0
    )
    assert await peers.fetch(PEER, "k", READ_TIMEOUT) == (MISSING, None)
    return state


async def test_a_peer_that_does_not_answer_in_time_is_not_asked_for_a_while(tmp_path):
    state = await _ask(tmp_path, stood_still=READ_TIMEOUT)
    assert state.peer_patience(PEER, READ_TIMEOUT, 0.5, READ_TIMEOUT) == 0.0


async def test_a_worker_frozen_while_it_waited_does_not_blame_the_peer(tmp_path):
    # SIGSTOP for 30 s while the request was out: the timeout fires on thaw, 25 s late.
    # Whether the peer answered meanwhile cannot be told: it stays in good standing.
    state = await _ask(tmp_path, stood_still=READ_TIMEOUT + 25.0)
    assert state.peer_patience(PEER, READ_TIMEOUT, 0.5, READ_TIMEOUT) == READ_TIMEOUT
