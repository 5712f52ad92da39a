"""Keeping what a task on this worker wrote (``cache_writes``), with a fake clock and network.

Through the worker cache's seam (``keep_written``), as the store calls it; the process
cluster's side is in ``tests/test_consistency.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from dask_zarr_cache.core.protocol import WriteReply
from dask_zarr_cache.index.digests import key_digest
from tests.fakes import FakeNetwork, Source

A, B = "tcp://a:1", "tcp://b:1"
K = "ns\x00data.zarr/c/0"


@pytest.fixture
def net():
    return FakeNetwork()


def kept(cache, data, seq, since, contested=(), epoch=None):
    """``cache`` keeps ``data``, the bytes of write ``seq`` that started at ``since``."""
    epoch = cache.state.epoch if epoch is None else epoch
    reply = WriteReply(epoch, seq, [], frozenset(contested))
    cache.keep_written(K, data, reply, (epoch, since))


async def test_a_kept_write_serves_every_worker_with_no_source_read(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    since = a.state.position()[1]
    kept(a, b"written", await net.write([K]), since)
    await net.idle()
    untouched = Source(b"never read")
    assert await a.get(K, untouched) == b"written"  # its own disk
    assert await b.get(K, untouched) == b"written"  # from a, through the index
    assert untouched.reads == 0
    assert net.index.owner(key_digest(K)) == A


async def test_a_kept_write_never_outlives_a_newer_write(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    first = await net.write([K])
    await net.write([K])  # b's newer write reached a before a kept its own
    kept(a, b"older", first, first - 1)
    kept(a, b"other history", first + 5, first + 4, epoch=b"another epoch")
    await net.idle()
    assert len(a.state.entries) == 0
    # Kept first, then the newer write: dropped like any copy.
    since = a.state.position()[1]
    kept(a, b"third", await net.write([K]), since)
    await net.idle()
    assert K in a.state.entries
    await net.write([K])
    newest = Source(b"newest")
    assert await a.get(K, newest) == b"newest" and newest.reads == 1
    assert await b.get(K, Source(b"never read")) == b"newest"


async def test_a_write_racing_another_of_its_key_keeps_nothing(net, clock, tmp_path):
    # Which of two overlapping writes reached the source last is unknown: neither is kept.
    a = await net.worker(A, tmp_path / "a", clock)
    since = a.state.position()[1]  # a's write starts; b's write of K is numbered first
    await net.write([K])
    kept(a, b"mine", await net.write([K]), since)
    await net.idle()
    assert len(a.state.entries) == 0
    since = a.state.position()[1]  # two writes of K in one batch
    kept(a, b"mine", await net.write([K, K]), since, contested=[K])
    await net.idle()
    assert len(a.state.entries) == 0
    since = a.state.position()[1]  # a write of another key meanwhile does not matter
    await net.write(["ns\x00data.zarr/c/9"])
    kept(a, b"mine", await net.write([K]), since)
    await net.idle()
    assert K in a.state.entries


async def test_a_kept_write_leaves_a_key_another_worker_fetches(net, clock, tmp_path):
    a = await net.worker(A, tmp_path / "a", clock)
    b = await net.worker(B, tmp_path / "b", clock)
    since = a.state.position()[1]
    seq = await net.write([K])
    slow = Source(b"written")
    slow.gate = asyncio.Event()
    fetching = asyncio.ensure_future(b.get(K, slow))  # b claimed the key at the index
    await slow.reached.wait()
    kept(a, b"written", seq, since)
    await net.idle()
    assert K not in a.state.entries  # b's fetch keeps the key; a's copy went
    assert [f.key for f in a.disk.scan()] == []  # and its file
    slow.gate.set()
    assert await fetching == b"written"
    await net.idle()
    assert net.index.owner(key_digest(K)) == B
