"""Group commit: one batch in flight, the writes that come meanwhile go together next."""

from __future__ import annotations

import asyncio

import pytest

from dask_zarr_cache.writes.group_commit import GroupCommit


async def test_writes_that_come_while_a_batch_is_out_go_together_next():
    batches, gate = [], asyncio.Event()

    async def commit(keys, prefixes):
        batches.append((keys, prefixes))
        await gate.wait()
        return len(batches)

    group = GroupCommit(commit)
    first = asyncio.ensure_future(group.submit(["a"], []))
    await asyncio.sleep(0)  # the first batch is out, alone: it waits for nobody
    rest = [asyncio.ensure_future(group.submit([k], ["p/"])) for k in "bcd"]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 1
    assert await asyncio.gather(*rest) == [2, 2, 2]
    assert batches == [(["a"], []), (["b", "c", "d"], ["p/", "p/", "p/"])]


async def test_a_failed_batch_fails_its_writes_only():
    async def commit(keys, prefixes):
        if "bad" in keys:
            raise OSError("scheduler gone")
        return keys

    group = GroupCommit(commit)
    with pytest.raises(OSError, match="scheduler gone"):
        await group.submit(["bad"], [])
    assert await group.submit(["good"], []) == ["good"]
