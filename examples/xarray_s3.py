"""xarray on S3: open a Zarr dataset through the cluster cache and compute on it.

Runs as is against a generated dataset on a loopback S3 server::

    python examples/xarray_s3.py

or on your data::

    python examples/xarray_s3.py --url s3://bucket/dataset.zarr --variable temperature
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import numpy as np
import xarray as xr
from distributed import Client, LocalCluster
from zarr.storage import FsspecStore

from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats


def _local_s3_dataset(stack: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    """Start a loopback S3 server holding a generated dataset; return its URL and options."""
    from dask_zarr_cache.testing import LocalS3Server

    s3 = stack.enter_context(LocalS3Server())
    s3.create_bucket("climate")
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), 15 + 8 * rng.standard_normal((24, 90, 180)))},
        coords={
            "time": np.arange(24),
            "lat": np.linspace(-89, 89, 90),
            "lon": np.linspace(-179, 179, 180),
        },
    )
    store = FsspecStore.from_url("s3://climate/era.zarr", storage_options=s3.storage_options)
    ds.chunk({"time": 6, "lat": 45, "lon": 90}).to_zarr(store, mode="w")
    return "s3://climate/era.zarr", s3.storage_options


def main(argv: list[str] | None = None, storage_options: dict[str, Any] | None = None) -> int:
    """Compute a time mean and a zonal mean twice; print the cache's work."""
    parser = argparse.ArgumentParser(description="xarray on S3 through dask-zarr-cache")
    parser.add_argument("--url", help="Zarr dataset on S3 (default: a generated local one)")
    parser.add_argument("--variable", default="temperature")
    parser.add_argument("--anon", action="store_true", help="anonymous S3 access")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url, options = args.url, dict(storage_options or {})
        if args.anon:
            options["anon"] = True
        if url is None:
            url, options = _local_s3_dataset(stack)
        cluster = stack.enter_context(
            LocalCluster(
                n_workers=2, threads_per_worker=2, host="127.0.0.1", dashboard_address="127.0.0.1:0"
            )
        )
        client = stack.enter_context(Client(cluster))
        client.register_plugin(ZarrCachePlugin(max_size="2GiB"))

        store = ClusterCacheStore(
            FsspecStore.from_url(url, read_only=True, storage_options=options)
        )
        ds = xr.open_zarr(store)
        var = ds[args.variable]
        time_mean = var.mean("time").compute()  # first read: from S3, once per chunk
        zonal = var.mean(["time", "lon"]).compute()  # second read: from the cache
        print(
            f"{args.variable}: time-mean range {float(time_mean.min()):.2f} .. "
            f"{float(time_mean.max()):.2f}; zonal mean at the equator "
            f"{float(zonal.sel(lat=0, method='nearest')):.2f}"
        )
        stats = cluster_stats(client)["total"]
        print(
            f"remote reads {stats['remote_reads']}, served from cache "
            f"{stats['hits'] + stats['peer_reads']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
