"""Quickstart: a local cluster reads a Zarr array from S3 through the shared cache.

Run it as is: it starts a loopback S3 server (moto) with a small generated array, so no
cloud account is needed::

    python examples/quickstart.py

Point it at your own data instead::

    python examples/quickstart.py --url s3://bucket/array.zarr --anon
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from typing import Any

import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster
from zarr.storage import FsspecStore

from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats


def _local_s3_array(stack: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    """Start a loopback S3 server holding a generated array; return its URL and options."""
    from dask_zarr_cache.testing import LocalS3Server

    s3 = stack.enter_context(LocalS3Server())
    s3.create_bucket("quickstart")
    options = s3.storage_options
    source = FsspecStore.from_url("s3://quickstart/data.zarr", storage_options=options)
    arr = zarr.create_array(source, shape=(1024, 1024), chunks=(128, 128), dtype="f4")
    arr[...] = np.random.default_rng(0).random((1024, 1024), dtype="f4")
    return "s3://quickstart/data.zarr", options


def main(argv: list[str] | None = None, storage_options: dict[str, Any] | None = None) -> int:
    """Read the array ``--passes`` times and print what the cache did."""
    parser = argparse.ArgumentParser(description="dask-zarr-cache quickstart")
    parser.add_argument("--url", help="Zarr array on S3 (default: a generated local one)")
    parser.add_argument("--anon", action="store_true", help="anonymous S3 access")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url, options = args.url, dict(storage_options or {})
        if args.anon:
            options["anon"] = True
        if url is None:
            url, options = _local_s3_array(stack)
        cluster = stack.enter_context(
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=2,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
            )
        )
        client = stack.enter_context(Client(cluster))

        # 1. Install the cache on every worker (and on workers that join later).
        client.register_plugin(ZarrCachePlugin(max_size="2GiB"))
        # 2. Wrap the source store; read as usual.
        store = ClusterCacheStore(
            FsspecStore.from_url(url, read_only=True, storage_options=options)
        )
        array = zarr.open_array(store, mode="r")
        print(f"{url}: shape {array.shape}, {array.nchunks} chunks")
        print(f"dashboard: {client.dashboard_link.rsplit('/', 1)[0]}/individual-zarr-cache")
        for i in range(args.passes):
            x = da.from_zarr(array, name=f"quickstart-{uuid.uuid4().hex}")
            start = time.perf_counter()
            total = float(x.sum().compute())
            print(f"pass {i + 1}: sum={total:.6g} in {time.perf_counter() - start:.2f} s")
        # 3. See what the cache did.
        stats = cluster_stats(client)["total"]
        print(
            f"remote reads {stats['remote_reads']}, peer reads {stats['peer_reads']}, "
            f"local hits {stats['hits']}, cached {stats['entries']} objects"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
