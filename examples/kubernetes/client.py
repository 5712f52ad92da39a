"""Read a Zarr array through the cluster cache of a Kubernetes-deployed Dask cluster.

Run after ``kubectl port-forward svc/<release>-dask-zarr-cache-scheduler 8786 8787``::

    python examples/kubernetes/client.py --scheduler tcp://localhost:8786 \
        --url s3://bucket/data.zarr --storage-option anon=true --passes 3

Each pass sums the whole array on the cluster; the first pass reads every chunk from the
object store, later passes read them from the workers' cache volumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import dask.array as da
import zarr
from distributed import Client
from zarr.storage import FsspecStore

from dask_zarr_cache import ClusterCacheStore, cluster_stats


def _storage_option(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is JSON if it parses (true, 3), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", required=True, help="e.g. tcp://localhost:8786")
    parser.add_argument("--url", required=True, help="Zarr array URL, e.g. s3://bucket/a.zarr")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        type=_storage_option,
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable), e.g. endpoint_url=http://minio:9000",
    )
    parser.add_argument("--passes", type=int, default=3, help="number of full reads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Sum the array ``--passes`` times through the cache; print timings and cache stats."""
    args = parse_args(argv)
    storage_options = dict(args.storage_option)
    store = ClusterCacheStore(
        FsspecStore.from_url(args.url, read_only=True, storage_options=storage_options)
    )
    array = zarr.open_array(store, mode="r")
    print(f"{args.url}: shape={array.shape} chunks={array.chunks} dtype={array.dtype}")
    with Client(args.scheduler) as client:
        for n in range(1, args.passes + 1):
            # A fresh graph name per pass, so every pass really reads the chunks.
            darr = da.from_zarr(array, name=f"read-{uuid.uuid4().hex}")
            start = time.perf_counter()
            total = client.compute(darr.sum()).result()
            print(f"pass {n}: sum={total!r} in {time.perf_counter() - start:.3f} s")
        print("cache:", json.dumps(cluster_stats(client)["total"], sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
