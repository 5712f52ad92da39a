"""Shared fixtures: a real S3 server on loopback and real multi-process Dask clusters."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any

import dask.array as da
import dask.config
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from zarr.storage import FsspecStore

from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin
from dask_zarr_cache.testing import LocalS3Server, loopback_cluster
from tests.fakes import FakeClock

if TYPE_CHECKING:
    from collections.abc import Iterator

_names = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _warm_zarr_threads() -> None:
    # zarr starts its I/O loop thread on first use; start it once, not inside a test.
    zarr.core.sync._get_loop()


@pytest.fixture
def clock() -> FakeClock:
    """The one fake clock of a unit test (every part it builds is given this one)."""
    return FakeClock()


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3Server]:
    """moto's S3 server on 127.0.0.1 with one bucket, ``test``."""
    with LocalS3Server() as server:
        server.create_bucket("test")
        yield server


@pytest.fixture
def s3_path(s3: LocalS3Server) -> str:
    """A fresh ``test/<name>.zarr`` prefix for one test."""
    return f"test/data-{next(_names)}.zarr"


def s3_store(s3: LocalS3Server, path: str, read_only: bool = False, **options: Any) -> FsspecStore:
    """An ``FsspecStore`` over s3fs for ``path`` on the loopback server.

    ``options`` are more s3fs options (e.g. fewer retries, for tests of server errors).
    """
    return FsspecStore.from_url(
        f"s3://{path}",
        read_only=read_only,
        storage_options={**s3.storage_options, "skip_instance_cache": True, **options},
    )


def obstore_s3(s3: LocalS3Server, path: str) -> Any:
    """An obstore ``S3Store`` for ``path`` (``bucket/prefix``) on the loopback server.

    Skips the test without obstore (an optional store: the floor leg of CI lacks it).
    """
    S3Store = pytest.importorskip("obstore.store").S3Store

    bucket, prefix = path.split("/", 1)
    return S3Store(
        bucket,
        prefix=prefix,
        endpoint=s3.endpoint_url,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        client_options={"allow_http": True},
    )


def icechunk_s3_storage(s3: LocalS3Server, path: str) -> Any:
    """Icechunk storage for ``path`` (``bucket/prefix``) on the loopback server."""
    import icechunk

    bucket, prefix = path.split("/", 1)
    return icechunk.s3_storage(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=s3.endpoint_url,
        allow_http=True,
        force_path_style=True,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )


def write_array(s3: LocalS3Server, path: str, data: np.ndarray, **kwargs) -> zarr.Array:
    """Write ``data`` as a zarr array at ``path`` on the S3 server."""
    arr = zarr.create_array(s3_store(s3, path), shape=data.shape, dtype=data.dtype, **kwargs)
    arr[...] = data
    return arr


def cached(s3: LocalS3Server, path: str) -> ClusterCacheStore:
    """A read-only ``ClusterCacheStore`` over ``path`` on the S3 server."""
    return ClusterCacheStore(s3_store(s3, path, read_only=True))


def read_all(store: ClusterCacheStore, client: Client) -> np.ndarray:
    """Read a whole array through ``store`` on the cluster.

    Each call builds a graph with fresh keys, so dask never answers from an earlier
    result (or an earlier error) of the same graph.
    """
    arr = zarr.open_array(store, mode="r")
    return client.compute(da.from_zarr(arr, name=f"read-{uuid.uuid4().hex}")).result()


def chunk_gets(s3: LocalS3Server, path: str) -> dict[str, int]:
    """Server-side GETs of the chunk/shard objects (not metadata) below ``path``."""
    metadata = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
    return {
        key: n
        for key, n in s3.object_gets.items()
        if key.startswith(path + "/") and not key.endswith(metadata)
    }


@contextlib.contextmanager
def cache_cluster(
    n_workers: int = 3, timings: dict[str, float] | None = None, **plugin_kwargs
) -> Iterator[tuple[LocalCluster, Client]]:
    """A multi-process cluster on 127.0.0.1 with the cache plugin registered.

    ``timings`` replace internal timings of :class:`CacheSettings` (e.g. ``disk_retry``).
    """
    with dask.config.set({"zarr-cache.flush-interval": "100ms"}):
        cluster = loopback_cluster(n_workers, 2)
    with cluster, Client(cluster) as client:
        plugin = ZarrCachePlugin(**{"max_size": "1GiB", **plugin_kwargs})
        plugin.settings = dataclasses.replace(plugin.settings, **(timings or {}))
        client.register_plugin(plugin)
        yield cluster, client


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalCluster, Client]]:
    """One 3-worker process cluster with a 1 GiB cache per worker, shared by a module."""
    with cache_cluster() as running:
        yield running


@pytest.fixture
def client(cluster) -> Client:
    return cluster[1]


def dask_command(*args: str) -> list[str]:
    """The ``dask`` command line of this interpreter (a venv need not be on ``PATH``)."""
    import sys

    return [sys.executable, "-m", "dask", *args]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def dask_processes(
    scheduler_cmd: list[str], worker_cmds: list[list[str]], env: dict[str, str]
) -> Iterator[None]:
    """Run a ``dask scheduler`` and ``dask worker`` commands as processes; stop them after.

    A command starting with ``dask`` runs this interpreter's (a venv need not be on PATH).
    """
    import os
    import subprocess

    def start(cmd: list[str]) -> subprocess.Popen:
        if cmd[0] == "dask":  # as rendered by the Helm chart: this interpreter's dask
            cmd = dask_command(*cmd[1:])
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL)

    full_env = {**os.environ, **env}
    procs = [start(scheduler_cmd)]
    try:
        time.sleep(1.0)  # let the scheduler bind before workers dial it
        for cmd in worker_cmds:
            procs.append(start(cmd))
        yield
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
async def worker_cache(tmp_path, monkeypatch):
    """A real scheduler, worker, index shard and ``WorkerCache`` in this test's loop.

    ``ClusterCacheStore`` finds its cache through ``get_worker()``, which only answers
    inside a task; here the lookup is pointed at this worker's real cache instead.
    """
    from distributed import Client, Scheduler, Worker

    from dask_zarr_cache import ZarrCachePlugin

    async with (
        Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler,
        Worker(scheduler.address, host="127.0.0.1", nthreads=2) as worker,
        Client(scheduler.address, asynchronous=True) as client,
    ):
        await client.register_plugin(ZarrCachePlugin(max_size="10MiB", directory=tmp_path / "c"))
        cache = worker.extensions["zarr_cache"]
        monkeypatch.setattr("dask_zarr_cache.store.worker_cache", lambda: cache)
        yield cache
