"""The index shards' lifecycle on real process clusters: loss, retirement, scale-down."""

from __future__ import annotations

import time

import dask.config
import numpy as np
import pytest
import zarr

from dask_zarr_cache import ZarrCachePlugin, cluster_stats
from dask_zarr_cache.index.digests import shard_of
from tests.conftest import cache_cluster, cached, chunk_gets, read_all, write_array
from tests.test_worker_faults import index_host, kill_worker, wait_for


def _shard_hosts(dask_scheduler):
    return [
        loc and loc["address"] for loc in dask_scheduler.extensions["zarr_cache"].shards.locations
    ]


def _keys_held(dask_worker):
    return sorted(dask_worker.extensions["zarr_cache"].state.entries)


def _read_whole(store):
    return zarr.open_array(store, mode="r")[...]


def _forget_owner_hints(dask_worker):
    dask_worker.extensions["zarr_cache"].state.hints._owners.clear()


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
        wait_for(  # the index learns of the evicted copies at the next flushes
            lambda: (
                cluster_stats(client)["index"]["entries"]
                == cluster_stats(client)["total"]["entries"]
            )
        )


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


def test_losing_one_index_shard_costs_only_its_keys(s3, s3_path):
    data = np.random.default_rng(25).random((128, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    config = {"zarr-cache.index-shards": 3, "zarr-cache.locality": False}
    with dask.config.set(config), cache_cluster(4) as (_cluster, client):
        wait_for(lambda: None not in client.run_on_scheduler(_shard_hosts), timeout=30)
        hosts = client.run_on_scheduler(_shard_hosts)
        assert len(set(hosts)) == 3, hosts  # one shard per worker
        store = cached(s3, s3_path)
        np.testing.assert_array_equal(read_all(store, client), data)
        wait_for(lambda: cluster_stats(client)["index"]["pending"] == 0)
        held = client.run(_keys_held)
        victim = hosts[0]
        kill_worker(client, victim)
        survivors = [a for a in held if a != victim]
        # Readers other than owners must ask the index.
        client.run(_forget_owner_hints, workers=survivors)
        s3.reset_counts()
        # Right after the loss, one worker reads everything (so most reads need the index):
        # only keys of the lost shard (or of the lost worker's disk) may go to the source.
        reader = next(a for a in survivors if a not in hosts)
        here = client.submit(_read_whole, store, workers=[reader], pure=False)
        np.testing.assert_array_equal(here.result(), data)
        refetched = {k.split("\x00")[1] for k in held[victim]} | {
            k.split("\x00")[1] for keys in held.values() for k in keys if shard_of(k, 3) == 0
        }
        gets = chunk_gets(s3, s3_path)
        assert set(gets) <= refetched, set(gets) - refetched
        assert max(gets.values(), default=1) <= 1
        # The shard comes back elsewhere and is refilled: read-once holds again.
        wait_for(lambda: client.run_on_scheduler(_shard_hosts)[0] not in (None, victim), 30)
        assert client.run_on_scheduler(_shard_hosts)[1:] == hosts[1:]  # others untouched
        np.testing.assert_array_equal(read_all(store, client), data)
        s3.reset_counts()
        for _ in range(2):
            client.run(_forget_owner_hints, workers=survivors)
            np.testing.assert_array_equal(read_all(store, client), data)
        assert chunk_gets(s3, s3_path) == {}, "read-once must hold again after recovery"
