"""The read path on real multi-process clusters over the loopback S3 server.

Every count of S3 GETs here is taken at the server (``LocalS3Server``), not from the
project's own counters.
"""

from __future__ import annotations

import time

import dask.array as da
import dask.config
import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import wait

from dask_zarr_cache import ClusterCacheStore, cluster_stats
from dask_zarr_cache.core.config import CacheSettings
from tests.conftest import cache_cluster, cached, chunk_gets, read_all, s3_store, write_array


def read_sum(store, client) -> float:
    return float(client.compute(da.from_zarr(zarr.open_array(store, mode="r")).sum()).result())


def test_each_chunk_is_read_from_s3_once_across_passes(s3, s3_path, client):
    data = np.random.default_rng(0).random((96, 96))
    write_array(s3, s3_path, data, chunks=(16, 16))
    store = cached(s3, s3_path)
    before = cluster_stats(client)["total"]
    s3.reset_counts()
    for _ in range(4):
        x = da.from_zarr(zarr.open_array(store, mode="r"))
        np.testing.assert_array_equal(client.compute(x).result(), data)
        # Another graph over the same chunks (steered to the same homes).
        np.testing.assert_allclose(client.compute(x.T.sum(axis=0)).result(), data.sum(axis=1))
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 36
    assert set(gets.values()) == {1}, gets
    after = cluster_stats(client)["total"]
    assert after["remote_reads"] - before["remote_reads"] == 36
    # 8 reads of 36 chunks: all but the first of each came from a worker's disk.
    served = sum(after[k] - before[k] for k in ("hits", "peer_reads"))
    assert served == 8 * 36 - 36


def test_xarray_dataset_is_read_once(s3, s3_path, client):
    rng = np.random.default_rng(1)
    ds = xr.Dataset(
        {
            "temp": (("time", "y", "x"), rng.random((8, 32, 32))),
            "wind": (("time", "y", "x"), rng.random((8, 32, 32)).astype("f4")),
        },
        coords={"time": np.arange(8), "y": np.arange(32.0), "x": np.arange(32.0)},
    )
    ds.chunk({"time": 2, "y": 16, "x": 16}).to_zarr(s3_store(s3, s3_path), mode="w")
    s3.reset_counts()
    for _ in range(3):
        opened = xr.open_zarr(cached(s3, s3_path))
        means = client.compute([opened.temp.mean(), opened.wind.sum(dim="time")])
        temp_mean, wind_sum = (r for r in client.gather(means))
        np.testing.assert_allclose(temp_mean, ds.temp.mean())
        np.testing.assert_allclose(wind_sum, ds.wind.sum(dim="time"), rtol=1e-6)
    gets = chunk_gets(s3, s3_path)
    data_gets = {k: n for k, n in gets.items() if k.split("/")[2] in ("temp", "wind")}
    assert len(data_gets) == 2 * 16
    assert set(data_gets.values()) == {1}, gets


def test_zarr_v2_array_is_read_once(s3, s3_path, client):
    data = np.arange(40 * 40, dtype="i4").reshape(40, 40)
    write_array(s3, s3_path, data, chunks=(10, 10), zarr_format=2)
    s3.reset_counts()
    for _ in range(3):
        assert read_sum(cached(s3, s3_path), client) == data.sum()
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 16 and set(gets.values()) == {1}


def test_sharded_array_is_correct_and_not_read_again(s3, s3_path, client):
    data = np.random.default_rng(2).random((64, 64))
    write_array(s3, s3_path, data, chunks=(8, 8), shards=(32, 32))
    store = cached(s3, s3_path)
    x = da.from_zarr(zarr.open_array(store, mode="r"), chunks=(16, 16))
    np.testing.assert_array_equal(client.compute(x).result(), data)
    after_first = chunk_gets(s3, s3_path)
    assert len(after_first) == 4  # four shard objects, read by byte ranges
    for _ in range(2):
        np.testing.assert_array_equal(client.compute(x).result(), data)
        np.testing.assert_array_equal(
            client.compute(x[5:50:3, 7:61:5]).result(), data[5:50:3, 7:61:5]
        )
    assert chunk_gets(s3, s3_path) == after_first


def test_namespaces_keep_sources_apart(s3, client):
    paths = ["test/ns-a.zarr", "test/ns-b.zarr"]
    arrays = [np.full((32, 32), i, dtype="i8") for i in (1, 2)]
    for path, data in zip(paths, arrays, strict=True):
        write_array(s3, path, data, chunks=(8, 8))  # identical keys, different bytes
    for _ in range(2):
        for path, data in zip(paths, arrays, strict=True):
            store = cached(s3, path)
            np.testing.assert_array_equal(
                client.compute(da.from_zarr(zarr.open_array(store, mode="r"))).result(), data
            )
    assert cached(s3, paths[0]).location != cached(s3, paths[1]).location


def _cache_bytes_on_disk(dask_worker) -> int:
    return sum(f.size for f in dask_worker.extensions["zarr_cache"].disk.scan())


def _read_chunks(store, indices):
    arr = zarr.open_array(store, mode="r")
    return [float(arr[i * 8 : (i + 1) * 8, :].sum()) for i in indices]


def _has_file(dask_worker, key) -> bool:
    return dask_worker.extensions["zarr_cache"].disk.path_of(key).exists()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # Cluster-wide LRU: chunk 1 (untouched) goes, chunk 0 (read by B) stays.
        ("lru", {0: True, 1: False, 2: True, 3: True, 4: True}),
        # TinyLFU: chunk 0 (read twice) stays; chunk 4, read once, does not displace what
        # was read as often (the array's metadata, then chunks 1-3): it goes itself.
        ("tinylfu", {0: True, 4: False}),
    ],
)
def test_eviction_keeps_disk_within_budget_and_follows_the_policy(s3, s3_path, policy, expected):
    chunk_bytes = 8 * 64 * 8  # (8, 64) float64 chunks, uncompressed
    data = np.random.default_rng(3).random((8 * 24, 64))
    write_array(s3, s3_path, data, chunks=(8, 64), compressors=None)
    with (
        dask.config.set({"zarr-cache.policy": policy}),
        cache_cluster(n_workers=2, max_size=4 * chunk_bytes) as (_cluster, client),
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        store = cached(s3, s3_path)
        # A fills its budget with chunks 0-3, then B reads chunk 0 from A (a peer read).
        client.submit(_read_chunks, store, [0, 1, 2, 3], workers=[a], pure=False).result()
        client.submit(_read_chunks, store, [0], workers=[b], pure=False).result()
        client.submit(_read_chunks, store, [4], workers=[a], pure=False).result()
        keys = [store.cache_key(f"c/{i}/0") for i in range(5)]
        present = {i: client.run(_has_file, key=k, workers=[a])[a] for i, k in enumerate(keys)}
        assert {i: present[i] for i in expected} == expected, present

        # A full read with tiny budgets: every worker stays within max_size on disk.
        x = da.from_zarr(zarr.open_array(store, mode="r"))
        for _ in range(2):
            np.testing.assert_array_equal(client.compute(x).result(), data)
        on_disk = client.run(_cache_bytes_on_disk)
        assert all(0 < n <= 4 * chunk_bytes for n in on_disk.values()), on_disk
        stats = cluster_stats(client)
        assert stats["total"]["evictions"] > 0
        for addr, counters in stats["workers"].items():
            assert counters["bytes"] == on_disk[addr]


def test_ttl_expiry_forces_a_fresh_read(s3, s3_path):
    ttl = 5.0
    data = np.arange(32 * 32, dtype="f8").reshape(32, 32)
    write_array(s3, s3_path, data, chunks=(16, 16))
    write_array(s3, s3_path + "-warmup", data, chunks=(16, 16))
    with cache_cluster(max_age_seconds=ttl) as (_cluster, client):
        # Untimed: a fresh cluster's first reads (sessions, the index, the first dataset's
        # check) are not what this test measures; the two timed passes must fit the TTL.
        read_sum(cached(s3, s3_path + "-warmup"), client)
        store = cached(s3, s3_path)
        s3.reset_counts()
        start = time.monotonic()
        assert read_sum(store, client) == data.sum()
        created_by = time.monotonic()  # every entry was written during the first pass
        assert read_sum(store, client) == data.sum()
        assert time.monotonic() - start < ttl, "machine too slow for this TTL"
        assert set(chunk_gets(s3, s3_path).values()) == {1}
        time.sleep(max(0.0, created_by + ttl + 0.5 - time.monotonic()))
        assert read_sum(store, client) == data.sum()
        assert set(chunk_gets(s3, s3_path).values()) == {2}
        assert cluster_stats(client)["total"]["expired"] >= 4


@pytest.mark.parametrize("where", ["worker", "client"])
def test_writes_invalidate_every_worker(s3, s3_path, client, where):
    data = np.zeros((32, 32), dtype="i8")
    write_array(s3, s3_path, data, chunks=(16, 16))
    workers = sorted(client.scheduler_info()["workers"])
    store = ClusterCacheStore(s3_store(s3, s3_path))

    def read_corner(store):
        return int(zarr.open_array(store, mode="r")[0, 0])

    def write_corner(store, value):
        zarr.open_array(store, mode="r+")[0:16, 0:16] = value

    for w in workers:  # every worker reads chunk (0, 0): one owns it, the rest peer-read
        assert client.submit(read_corner, store, workers=[w], pure=False).result() == 0
    for value in (7, 9):
        if where == "worker":
            client.submit(write_corner, store, value, workers=[workers[-1]], pure=False).result()
        else:
            write_corner(store, value)
        for w in workers:
            got = client.submit(read_corner, store, workers=[w], pure=False).result()
            assert got == value, (w, got)


def test_reads_outside_workers_go_straight_to_the_source(s3, s3_path, client):
    data = np.arange(16, dtype="i2")
    write_array(s3, s3_path, data, chunks=(4,))
    s3.reset_counts()
    arr = zarr.open_array(cached(s3, s3_path), mode="r")
    for _ in range(2):
        np.testing.assert_array_equal(arr[:], data)
    assert set(chunk_gets(s3, s3_path).values()) == {2}


def test_pending_reads_of_one_key_make_one_request(s3, s3_path, client):
    data = np.arange(64, dtype="f8")
    write_array(s3, s3_path, data, chunks=(64,))
    s3.reset_counts()
    s3.latency = 0.3  # keep the first fetch in flight while the others arrive
    try:
        store = cached(s3, s3_path)
        futures = [
            client.submit(lambda s: float(zarr.open_array(s, mode="r")[:].sum()), store, pure=False)
            for _ in range(24)
        ]
        wait(futures)
        assert {f.result() for f in futures} == {data.sum()}
    finally:
        s3.latency = 0
    assert chunk_gets(s3, s3_path) == {f"{s3_path}/c/0": 1}


def test_revalidation_picks_up_changes_behind_the_cache_and_keeps_the_rest(s3, s3_path):
    revalidate_after, margin = 2.0, 1.0
    data = np.random.default_rng(26).random((5 * 16, 4 * 16))  # 20 chunks of 2 KiB
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)
    time.sleep(margin + 0.5)  # older than the margin when first read
    timings = {"clock_margin": margin}
    with cache_cluster(revalidate_after=revalidate_after, timings=timings) as (_c, client):
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), data)
        direct = zarr.open_array(s3_store(s3, s3_path), mode="r+")  # behind the cache's back
        direct[0:16, 0:16] = -1.0
        direct[64:80, 48:64] = -2.0
        expected = np.array(direct[:])
        changed_at = time.monotonic()
        s3.reset_counts()
        polls = 1
        while not np.array_equal(read_all(store, client), expected):
            assert time.monotonic() - changed_at < 30, "the change never showed"
            time.sleep(0.2)
            polls += 1
        seen_after = time.monotonic() - changed_at
        stats = cluster_stats(client)["total"]
        gets = chunk_gets(s3, s3_path)
        lists = sum(n for (verb, p), n in s3.requests.items() if verb == "GET" and "/" not in p)
    bound = revalidate_after + CacheSettings(max_size=1).revalidate_grace + 1.0  # + a flush
    assert seen_after <= bound, seen_after
    # The cost: per check, one LIST per worker and directory it holds objects of (5 chunk
    # rows and the root, on 3 workers); a check every revalidate_after at most.
    checks = 1 + seen_after / revalidate_after
    assert 0 < lists <= 3 * 6 * checks + 2 * polls, (lists, seen_after)  # + opens: 2 each
    print(f"revalidation: change seen after {seen_after:.1f} s, {lists} LISTs, {gets} GETs")
    assert gets == {f"{s3_path}/c/0/0": 1, f"{s3_path}/c/4/3": 1}, gets  # the rest stayed
    assert stats["revalidate_dropped"] >= 2 and stats["revalidated"] > 0, stats
