"""A new cluster on the disks of an old one keeps the files the source shows unchanged.

Real parts: process clusters one after the other on the same cache directories, loopback
S3 with GETs and LISTs counted at the server, objects changed behind the cache's back in
between.
"""

from __future__ import annotations

import time
import uuid

import dask.array as da
import numpy as np
import pytest
import zarr

from dask_zarr_cache import ClusterCacheStore, cluster_stats
from tests.conftest import (
    cache_cluster,
    cached,
    chunk_gets,
    icechunk_s3_storage,
    read_all,
    s3_store,
    write_array,
)
from tests.test_worker_faults import wait_for

#: A small margin, so the test need not wait a minute between writing and reading.
MARGIN = 1.0
TIMINGS = {"clock_margin": MARGIN}
CHUNK = 16


def _lists(s3) -> int:
    """LIST requests the server saw (GETs of the bucket itself)."""
    return sum(n for (verb, path), n in s3.requests.items() if verb == "GET" and "/" not in path)


def test_a_new_cluster_fetches_only_what_changed_behind_its_back(s3, s3_path, tmp_path):
    data = np.random.default_rng(25).random((5 * CHUNK, 4 * CHUNK))  # 20 chunks of 2 KiB
    write_array(s3, s3_path, data, chunks=(CHUNK, CHUNK), compressors=None)
    time.sleep(MARGIN + 0.5)  # the objects are older than the margin when first read
    directory = tmp_path / "caches"
    with cache_cluster(directory=directory, timings=TIMINGS) as (_cluster, client):
        np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        wait_for(lambda: cluster_stats(client)["index"]["entries"] >= 20)  # all committed

    # Between the clusters, 2 of the 20 chunks (10%) change at the source, same sizes.
    direct = zarr.open_array(s3_store(s3, s3_path), mode="r+")
    direct[0:CHUNK, 0:CHUNK] = -1.0
    direct[3 * CHUNK : 4 * CHUNK, 2 * CHUNK : 3 * CHUNK] = -2.0
    expected = np.array(direct[:])
    changed = {f"{s3_path}/c/0/0", f"{s3_path}/c/3/2"}

    s3.reset_counts()
    with cache_cluster(directory=directory, timings=TIMINGS) as (_cluster, client):
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), expected)
        first_pass = chunk_gets(s3, s3_path)
        lists = _lists(s3)
        stats = cluster_stats(client)["total"]
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), expected)
        assert not chunk_gets(s3, s3_path)  # and then everything is cached
    assert first_pass == dict.fromkeys(changed, 1), first_pass  # exactly what changed
    assert stats["adopt_refused"] == 2 and stats["adopted"] >= 18, stats
    assert 1 <= lists <= 3 * (5 + 1), lists  # at most one per worker and directory (5 + root)


def test_without_a_listing_that_proves_it_nothing_old_is_served(s3, s3_path, tmp_path):
    # The objects are rewritten with the same bytes' sizes right after the first read:
    # younger than the margin when read, they cannot be shown unchanged. Nothing is kept.
    data = np.arange(4 * CHUNK, dtype="f8")
    write_array(s3, s3_path, data, chunks=(CHUNK,), compressors=None)
    directory = tmp_path / "caches"
    with cache_cluster(directory=directory, timings={"clock_margin": 3600.0}) as (_c, client):
        np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        wait_for(lambda: cluster_stats(client)["index"]["entries"] >= 4)
    s3.reset_counts()
    with cache_cluster(directory=directory, timings={"clock_margin": 3600.0}) as (_c, client):
        np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        stats = cluster_stats(client)["total"]
    assert set(chunk_gets(s3, s3_path).values()) == {1} and len(chunk_gets(s3, s3_path)) == 4
    assert stats["adopted"] == 0 and stats["adopt_refused"] >= 4


def test_icechunk_snapshot_files_are_kept_without_a_check(s3, s3_path, tmp_path):
    icechunk = pytest.importorskip("icechunk")
    storage = icechunk_s3_storage(s3, s3_path)
    repo = icechunk.Repository.create(storage)
    data = np.random.default_rng(8).random((32, 32))  # incompressible: chunks not inlined
    session = repo.writable_session("main")
    zarr.open_array(session.store, path="a", mode="a", shape=(32, 32), chunks=(16, 16))[...] = data
    snapshot = session.commit("one")

    def read(client):
        store = ClusterCacheStore(repo.readonly_session(snapshot_id=snapshot).store)
        arr = zarr.open_array(store, path="a", mode="r")
        return client.compute(da.from_zarr(arr, name=f"ice-{uuid.uuid4().hex}")).result()

    def chunk_gets() -> int:  # Icechunk's GETs carry a query string: count every GET
        chunks = f"{s3_path}/chunks/"
        return sum(n for (m, k), n in s3.requests.items() if m == "GET" and k.startswith(chunks))

    directory = tmp_path / "caches"
    s3.reset_counts()
    with cache_cluster(directory=directory) as (_cluster, client):
        np.testing.assert_array_equal(read(client), data)
        wait_for(lambda: cluster_stats(client)["index"]["entries"] >= 4)
    assert chunk_gets() == 4
    s3.reset_counts()
    with cache_cluster(directory=directory) as (_cluster, client):
        np.testing.assert_array_equal(read(client), data)
    assert chunk_gets() == 0  # a snapshot never changes: its files need no listing
    assert _lists(s3) == 0


def test_a_store_declared_immutable_is_kept_without_a_listing(s3, s3_path, tmp_path):
    data = np.arange(4 * CHUNK, dtype="f8")
    write_array(s3, s3_path, data, chunks=(CHUNK,), compressors=None)
    directory = tmp_path / "caches"

    def store():
        return ClusterCacheStore(s3_store(s3, s3_path, read_only=True), immutable=True)

    with cache_cluster(directory=directory) as (_c, client):  # the 60 s margin: no proof
        np.testing.assert_array_equal(read_all(store(), client), data)
        wait_for(lambda: cluster_stats(client)["index"]["entries"] >= 4)
    s3.reset_counts()
    with cache_cluster(directory=directory) as (_c, client):
        np.testing.assert_array_equal(read_all(store(), client), data)
        stats = cluster_stats(client)["total"]
    assert not chunk_gets(s3, s3_path)
    assert stats["adopted"] == stats["adopt_refused"] == 0  # kept as they were: no check


def test_a_worker_joining_after_the_check_gets_its_files_checked(s3, s3_path, tmp_path):
    data = np.random.default_rng(26).random((5 * CHUNK, 4 * CHUNK))  # 20 chunks
    write_array(s3, s3_path, data, chunks=(CHUNK, CHUNK), compressors=None)
    time.sleep(MARGIN + 0.5)
    directory = tmp_path / "caches"
    with cache_cluster(directory=directory, timings=TIMINGS) as (_cluster, client):
        np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        wait_for(lambda: cluster_stats(client)["index"]["entries"] >= 20)

    with cache_cluster(1, directory=directory, timings=TIMINGS) as (cluster, client):
        store = cached(s3, s3_path)
        # One worker reads one chunk: the dataset's files are checked, on that worker.
        first = zarr.open_array(store, mode="r")
        one = client.submit(lambda: first[0:CHUNK, 0:CHUNK], pure=False).result()
        np.testing.assert_array_equal(one, data[0:CHUNK, 0:CHUNK])
        cluster.scale(3)  # the other two come back on their directories, after the check
        client.wait_for_workers(3)
        wait_for(lambda: cluster_stats(client)["total"]["adopted"] >= 19)
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), data)
    assert not chunk_gets(s3, s3_path)  # every file, wherever it was, served again
