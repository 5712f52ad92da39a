from __future__ import annotations

import asyncio

import pytest

from dask_zarr_cache.worker.flights import ASKING, PEER, SOURCE, Fetch, NotFetchingError


async def test_a_load_asking_the_index_again_is_waited_for_until_it_decides():
    # Round two of a read (a peer failed): the load asks the index again, and a peer's
    # request must wait for that answer too, not only for the first one.
    fetch = Fetch(0)
    fetch.enter(PEER)
    fetch.enter(ASKING)
    waiter = asyncio.ensure_future(fetch.source_outcome())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    fetch.enter(SOURCE)
    fetch.future.set_result(b"bytes")
    assert await waiter == b"bytes"


async def test_a_load_waiting_on_a_peer_is_not_waited_on():
    fetch = Fetch(0)
    fetch.enter(PEER)
    with pytest.raises(NotFetchingError):
        await fetch.source_outcome()
