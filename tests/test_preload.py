"""The preload: ``dask scheduler/worker --preload dask_zarr_cache.preload`` processes."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
from distributed import Client

from dask_zarr_cache import ZarrCacheError, cluster_stats
from tests.conftest import (
    cached,
    chunk_gets,
    dask_processes,
    free_port,
    read_all,
    write_array,
)
from tests.test_worker_faults import wait_for

PRELOAD = ["--preload", "dask_zarr_cache.preload"]


def cache_workers(client) -> int:
    """Workers with a cache, 0 while the plugin is not registered yet (a clear error)."""
    try:
        return len(cluster_stats(client)["workers"])
    except ZarrCacheError as err:
        assert "not registered" in str(err)
        return 0


def commands(port: int, dashboard: int, n_workers: int, scheduler_preload: bool):
    scheduler = ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler += ["--dashboard-address", f"127.0.0.1:{dashboard}"]
    worker = ["dask", "worker", f"tcp://127.0.0.1:{port}", "--host", "127.0.0.1"]
    worker += ["--nthreads", "2", "--dashboard-address", "127.0.0.1:0", *PRELOAD]
    return scheduler + (PRELOAD if scheduler_preload else []), [worker] * n_workers


def test_preloaded_cluster_caches_without_client_code(s3, s3_path, tmp_path):
    data = np.random.default_rng(40).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    port, dashboard = free_port(), free_port()
    scheduler, workers = commands(port, dashboard, 2, scheduler_preload=True)
    env = {
        "DASK_ZARR_CACHE__MAX_SIZE": "3MiB",
        "DASK_ZARR_CACHE__MAX_AGE_SECONDS": "600",
        "DASK_ZARR_CACHE__DIRECTORY": str(tmp_path / "cache"),
    }
    with dask_processes(scheduler, workers, env), Client(f"tcp://127.0.0.1:{port}") as client:
        client.wait_for_workers(2, timeout=60)
        wait_for(lambda: len(cluster_stats(client)["workers"]) == 2, timeout=30)
        stats = cluster_stats(client)
        assert {w["capacity"] for w in stats["workers"].values()} == {3 * 2**20}
        s3.reset_counts()
        for _ in range(3):
            np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        assert set(chunk_gets(s3, s3_path).values()) == {1}
        assert (tmp_path / "cache").is_dir()
        # The page is served and listed in the dashboard's "More..." menu.
        base = f"http://127.0.0.1:{dashboard}"
        menu = json.loads(urllib.request.urlopen(base + "/individual-plots.json").read())
        assert "/individual-zarr-cache" in menu.values()
        page = urllib.request.urlopen(base + "/individual-zarr-cache").read().decode()
        assert "Dask: Zarr Cache" in page


def test_worker_preload_alone_installs_the_cache(s3, s3_path):
    data = np.arange(32 * 32, dtype="i4").reshape(32, 32)
    write_array(s3, s3_path, data, chunks=(16, 16))
    port = free_port()
    scheduler, workers = commands(port, free_port(), 2, scheduler_preload=False)
    env = {"DASK_ZARR_CACHE__MAX_SIZE": "5MiB"}
    with dask_processes(scheduler, workers, env), Client(f"tcp://127.0.0.1:{port}") as client:
        client.wait_for_workers(2, timeout=60)
        wait_for(lambda: cache_workers(client) == 2, timeout=30)
        s3.reset_counts()
        for _ in range(2):
            np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
        assert set(chunk_gets(s3, s3_path).values()) == {1}
        assert {w["capacity"] for w in cluster_stats(client)["workers"].values()} == {5 * 2**20}
