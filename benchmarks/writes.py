"""Writes through the cache against writes straight to the source, in one run.

Usage::

    python -m benchmarks.writes [--workers 2,4] [--chunks 256] [--chunk-kib 64]
                                [--latency-ms 20] [--passes 5] [--sources s3,local]

For each source (``s3``: moto's S3 server on loopback with ``--latency-ms`` per request;
``local``: a ``LocalStore``, a free source that shows what latency cannot hide) and each
worker count (1 thread each), a cluster with the cache writes ``--chunks`` chunks of
``--chunk-kib`` KiB, ``--passes`` times per workload, direct and through the cache
interleaved:

- ``dask to_zarr``: ``da.to_zarr`` into an existing array;
- ``xarray region``: ``Dataset.to_zarr(region=...)``, one task per region of 8 chunks.

Prints each ratio (cache / direct) as the median of the paired passes with its min-max,
and, on S3, the chunk GETs the server saw when the array just written through the cache is
read back, with ``cache_writes`` on and off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from distributed import Client
from zarr.storage import FsspecStore, LocalStore

from benchmarks._report import Spread
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin
from dask_zarr_cache.testing import LocalS3Server, loopback_cluster

__all__ = ["main"]

BUCKET = "writes"
REGION_CHUNKS = 8  # chunks per xarray region write


class Source:
    """Where the arrays are written: a fresh path per pass."""

    def __init__(self, kind: str, s3: LocalS3Server | None, root: str) -> None:
        self.kind, self.s3, self.root = kind, s3, root

    def store(self, path: str) -> Any:
        if self.s3 is None:
            return LocalStore(f"{self.root}/{path}")
        return FsspecStore.from_url(
            f"s3://{BUCKET}/{path}", storage_options=self.s3.storage_options, read_only=False
        )


def _dask_to_zarr(store: Any, data: np.ndarray, chunk: int) -> None:
    target = zarr.create_array(store, shape=data.shape, chunks=(chunk,), dtype=data.dtype)
    da.from_array(data, chunks=(chunk,)).to_zarr(target, compute=False).compute()


def _xarray_region(store: Any, data: np.ndarray, chunk: int) -> None:
    ds = xr.Dataset({"v": (("x",), data)})
    template = xr.Dataset({"v": (("x",), da.zeros(data.shape, chunks=(chunk,), dtype=data.dtype))})
    template.to_zarr(store, compute=False, mode="w", zarr_format=3)
    step = chunk * REGION_CHUNKS
    regions = [slice(i, min(i + step, data.size)) for i in range(0, data.size, step)]
    parts = [
        ds.isel(x=r).chunk({"x": chunk}).to_zarr(store, region={"x": r}, compute=False)
        for r in regions
    ]
    da.compute(*parts)


WORKLOADS: dict[str, Callable[[Any, np.ndarray, int], None]] = {
    "dask to_zarr": _dask_to_zarr,
    "xarray region": _xarray_region,
}


def _timed(write: Callable[[Any, np.ndarray, int], None], store: Any, data, chunk) -> float:
    start = time.perf_counter()
    write(store, data, chunk)
    return time.perf_counter() - start


def _read_back_gets(client: Client, source: Source, data: np.ndarray, chunk: int) -> int:
    """Chunk GETs at the server for reading back an array just written through the cache."""
    path = f"readback-{uuid.uuid4().hex}"
    store = ClusterCacheStore(source.store(path))
    _dask_to_zarr(store, data, chunk)
    client.run(_idle)
    before = _chunk_gets(source.s3, path)
    arr = zarr.open_array(store, mode="r")
    got = client.compute(da.from_zarr(arr, name=f"read-{uuid.uuid4().hex}")).result()
    np.testing.assert_array_equal(got, data)
    return _chunk_gets(source.s3, path) - before


async def _idle(dask_worker: Any) -> None:
    await dask_worker.extensions["zarr_cache"].idle()


def _chunk_gets(s3: LocalS3Server | None, path: str) -> int:
    assert s3 is not None
    prefix = f"{BUCKET}/{path}/c/"
    return sum(n for key, n in s3.object_gets.items() if key.startswith(prefix))


def run_source(args: argparse.Namespace, kind: str, workers: int, scratch: str) -> list[str]:
    """One source and worker count: a line per workload, and the read-back GETs on S3."""
    data = np.random.default_rng(0).random(args.chunks * args.chunk_kib * 128)  # f8: 8 B
    chunk = args.chunk_kib * 128
    lines = []
    s3 = LocalS3Server(latency=0.0) if kind == "s3" else None
    server = s3 if s3 is not None else contextlib.nullcontext()
    with server, loopback_cluster(workers, 1) as cluster:
        if s3 is not None:
            import s3fs

            s3fs.S3FileSystem(**s3.storage_options).makedirs(BUCKET, exist_ok=True)
        source = Source(kind, s3, f"{scratch}/{kind}-{workers}")
        with Client(cluster) as client:
            client.register_plugin(
                ZarrCachePlugin(
                    max_size="4GiB",
                    directory=f"{scratch}/cache-{kind}-{workers}",
                    cache_writes=args.cache_writes == "on",
                )
            )
            for name, write in WORKLOADS.items():
                write(source.store(f"warm-{uuid.uuid4().hex}"), data[: chunk * 8], chunk)
                if s3 is not None:
                    s3.latency = args.latency_ms / 1000
                direct, cached = [], []
                for _ in range(args.passes):
                    direct.append(_timed(write, source.store(uuid.uuid4().hex), data, chunk))
                    store = ClusterCacheStore(source.store(uuid.uuid4().hex))
                    cached.append(_timed(write, store, data, chunk))
                if s3 is not None:
                    s3.latency = 0.0
                lines.append(
                    f"| {kind} | {workers} | {name} | {statistics.median(direct):.2f} | "
                    f"{statistics.median(cached):.2f} | {Spread.paired(cached, direct)} |"
                )
            if s3 is not None:
                kept = _read_back_gets(client, source, data, chunk)
                client.register_plugin(
                    ZarrCachePlugin(
                        max_size="4GiB",
                        directory=f"{scratch}/cache-{kind}-{workers}",
                        cache_writes=False,
                    )
                )
                not_kept = _read_back_gets(client, source, data, chunk)
                lines.append(
                    f"| {kind} | {workers} | read back after to_zarr: chunk GETs, "
                    f"cache_writes on / off | {kept} | {not_kept} | of {args.chunks} chunks |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the write benchmark; prints a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.writes")
    parser.add_argument("--workers", default="2,4", help="worker counts, comma-separated")
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--sources", default="s3,local")
    parser.add_argument(
        "--cache-writes", choices=("on", "off"), default="on", help="the plugin's cache_writes"
    )
    args = parser.parse_args(argv)
    lines = [
        f"Writes, measured {dt.date.today().isoformat()}: {args.chunks} chunks of "
        f"{args.chunk_kib} KiB, 1 thread per worker, S3 at {args.latency_ms:g} ms per "
        f"request, {args.passes} passes each, direct and cached interleaved, cache_writes "
        f"{args.cache_writes}.",
        "",
        "| source | workers | workload | direct s (median) | cache s (median) | cache / direct |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="dzc-writes-") as scratch:
        for kind in args.sources.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                print("\n".join(run_source(args, kind, workers, scratch)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
