"""GPU reads through the cache: ``zarr.config.enable_gpu()`` on a Dask-CUDA cluster.

Skipped, with the reason, without CuPy, dask-cuda or a GPU. The CPU side of the promise
(every read path builds the prototype's buffer) is ``test_store.py``'s, and runs anywhere.
"""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client

from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin
from tests.conftest import chunk_gets, s3_store, write_array

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
dask_cuda = pytest.importorskip("dask_cuda", reason="dask-cuda is not installed")


def _gpus() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no device
        return 0


pytestmark = pytest.mark.skipif(_gpus() == 0, reason="no GPU on this machine")


def _enable_gpu() -> None:
    zarr.config.enable_gpu()  # in each worker process: its reads ask for GPU buffers


def test_gpu_reads_arrive_on_the_gpu_and_fetch_each_chunk_once(s3, s3_path):
    data = np.random.default_rng(0).random((256, 256), dtype="f4")
    write_array(s3, s3_path, data, chunks=(64, 64))
    with (
        dask_cuda.LocalCUDACluster(host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ZarrCachePlugin(max_size="1GiB"))
        client.run(_enable_gpu)
        store = ClusterCacheStore(s3_store(s3, s3_path, read_only=True))
        for _ in range(2):
            arr = zarr.open_array(store, mode="r")
            x = da.from_zarr(arr, name=f"gpu-read-{uuid.uuid4().hex}")
            result = client.compute(x).result()
            assert isinstance(result, cupy.ndarray)
            np.testing.assert_array_equal(cupy.asnumpy(result), data)
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 16 and set(gets.values()) == {1}  # 1.00 GET per chunk, two passes
