"""The index actor's lifecycle on real process clusters: loss, retirement, scale-down."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dask_zarr_cache import ZarrCachePlugin, cluster_stats
from tests.conftest import cache_cluster, cached, chunk_gets, read_all, write_array
from tests.test_worker_faults import index_host, kill_worker, wait_for


def index_location(client):
    return client.run_on_scheduler(index_host)


def test_index_host_killed_reads_fall_back_then_read_once_returns(s3, s3_path):
    data = np.random.default_rng(20).random((128, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster() as (_cluster, client):
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), data)
        host = index_location(client)
        kill_worker(client, host)
        # Right after the loss: reads work (from peers, or the source), no errors.
        np.testing.assert_array_equal(read_all(store, client), data)
        wait_for(lambda: index_location(client) not in (None, host), timeout=30)
        survivors = [a for a in client.scheduler_info()["workers"] if a != host]
        # The new index is refilled from what the surviving workers hold on disk.
        wait_for(
            lambda: all(
                cluster_stats(client)["index"]["workers"].get(a, {}).get("entries")
                == cluster_stats(client)["workers"][a]["entries"]
                for a in survivors
            ),
            timeout=10,
        )
        np.testing.assert_array_equal(read_all(store, client), data)  # refills the gap
        s3.reset_counts()
        start = time.monotonic()
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        assert chunk_gets(s3, s3_path) == {}, "read-once must hold again after recovery"
        assert time.monotonic() - start < 30


def test_retiring_the_index_host_moves_the_index(s3, s3_path):
    data = np.random.default_rng(21).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster() as (_cluster, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), data)
        host = index_location(client)
        held = client.run(
            lambda dask_worker: len(dask_worker.extensions["zarr_cache"].state.entries)
        )
        retired = client.retire_workers([host])
        assert host in retired, "retirement of the index host was refused"
        assert host not in client.scheduler_info()["workers"]
        wait_for(lambda: index_location(client) not in (None, host), timeout=30)
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        gets = chunk_gets(s3, s3_path)
        # Only what the retired worker held is read again, once.
        assert sum(gets.values()) <= 16 + held[host]
        assert max(gets.values()) <= 2


@pytest.mark.parametrize("target", [1])
def test_scale_down_never_hangs_on_the_index(s3, s3_path, target):
    data = np.random.default_rng(22).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster() as (cluster, client):
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), data)
        start = time.monotonic()
        cluster.scale(target)
        wait_for(lambda: len(client.scheduler_info()["workers"]) == target, timeout=60)
        assert time.monotonic() - start < 60
        (last,) = client.scheduler_info()["workers"]
        wait_for(lambda: index_location(client) == last, timeout=30)
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)


def test_registering_again_applies_new_settings(s3, s3_path):
    data = np.random.default_rng(23).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)  # 2 KiB chunks
    with cache_cluster() as (_cluster, client):
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), data)
        assert cluster_stats(client)["total"]["entries"] == 16
        with pytest.warns(UserWarning, match="overwriting"):
            client.register_plugin(ZarrCachePlugin(max_size=3 * 2048))
        wait_for(
            lambda: all(
                w["capacity"] == 3 * 2048 for w in cluster_stats(client)["workers"].values()
            )
        )
        np.testing.assert_array_equal(read_all(store, client), data)
        stats = cluster_stats(client)
        assert all(w["bytes"] <= 3 * 2048 for w in stats["workers"].values())
        assert all(w["capacity"] == 3 * 2048 for w in stats["index"]["workers"].values())


def test_workers_that_join_later_get_the_cache(s3, s3_path):
    data = np.random.default_rng(24).random((32, 32))
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster(n_workers=1) as (cluster, client):
        cluster.scale(3)
        client.wait_for_workers(3)
        wait_for(lambda: len(cluster_stats(client)["workers"]) == 3)
        store = cached(s3, s3_path)
        s3.reset_counts()
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        assert set(chunk_gets(s3, s3_path).values()) == {1}


def test_cluster_stats_without_the_plugin_is_a_clear_error():
    from distributed import Client, LocalCluster

    from dask_zarr_cache import ZarrCacheError

    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
        pytest.raises(ZarrCacheError, match="not registered"),
    ):
        cluster_stats(client)
