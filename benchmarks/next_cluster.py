"""The first pass of a new cluster on the disks of an old one, against a cold pass.

Usage::

    python -m benchmarks.next_cluster [--workers 4] [--side 4096] [--chunk 256]
                                      [--latency-ms 20]

A cluster reads the dataset cold (through the cache) and stops; a second cluster starts
on the same cache directories and reads it again: its files are checked against S3 with
one LIST per worker and chunk directory, then served. Prints both passes, the ratio, and
the GETs and LISTs the server saw during the second cluster's first pass. One run; the
dataset is the one of ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import tempfile
import time
from pathlib import Path

from distributed import Client

from benchmarks._s3 import ParallelS3Server
from benchmarks.run import PATH, WARMUP, _chunk_requests, _read_pass, write_dataset
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats
from dask_zarr_cache.testing import loopback_cluster

#: The benchmark's dataset is written seconds before it is read: a margin this small lets
#: its objects be shown unchanged (the default, 60 s, would refuse every one of them).
CLOCK_MARGIN = 1.0


def _cluster_pass(
    args: argparse.Namespace, s3: ParallelS3Server, directory: Path, expected: float
) -> dict[str, float]:
    """Start a cluster on ``directory``, read the dataset once; seconds and requests."""
    options = tuple(sorted(s3.storage_options.items()))
    with loopback_cluster(args.workers, 1) as cluster, Client(cluster) as client:
        plugin = ZarrCachePlugin(max_size="4GiB", directory=directory)
        plugin.settings = dataclasses.replace(plugin.settings, clock_margin=CLOCK_MARGIN)
        client.register_plugin(plugin)
        store = ClusterCacheStore.from_url(f"s3://{PATH}", storage_options=dict(options))
        warmup = ClusterCacheStore.from_url(f"s3://{WARMUP}", storage_options=dict(options))
        s3.latency = 0
        _read_pass(warmup, client, None)  # untimed: imports and sessions in every process
        s3.latency = args.latency_ms / 1000
        before = s3.counts()
        seconds, ok = _read_pass(store, client, expected)
        after = s3.counts()
        stats = cluster_stats(client)["total"]
    lists = sum(
        n - before["requests"].get((m, p), 0)
        for (m, p), n in after["requests"].items()
        if m == "GET" and "/" not in p
    )
    gets = _chunk_requests(after, PATH)["GET"] - _chunk_requests(before, PATH)["GET"]
    return {
        "seconds": seconds,
        "correct": ok,
        "gets": gets,
        "lists": lists,
        "adopted": stats["adopted"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both clusters and print what each pass cost."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.next_cluster")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--s3-processes", type=int, default=2)
    args = parser.parse_args(argv)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="dzc-next-") as scratch:
        source = Path(scratch) / "source"
        data, info = write_dataset(args, source)
        expected = float(data.astype("f8").sum())
        time.sleep(CLOCK_MARGIN + 1)  # the objects are older than the margin when read
        with ParallelS3Server(source, processes=args.s3_processes) as s3:
            directory = Path(scratch) / "caches"
            cold = _cluster_pass(args, s3, directory, expected)
            following = _cluster_pass(args, s3, directory, expected)
    chunks = info["n_chunks"]
    print(
        f"next cluster ({when}): {args.workers} workers, {chunks} chunks of "
        f"{info['chunk_bytes'] // 1024} KiB, S3 at {args.latency_ms:g} ms\n"
        f"  cold pass (first cluster):       {cold['seconds']:.2f} s, "
        f"{cold['gets'] / chunks:.2f} GETs/chunk, {cold['lists']} LISTs\n"
        f"  first pass of the next cluster:  {following['seconds']:.2f} s, "
        f"{following['gets'] / chunks:.2f} GETs/chunk, {following['lists']} LISTs, "
        f"{following['adopted']} files kept\n"
        f"  ratio next / cold: {following['seconds'] / cold['seconds']:.2f}"
    )
    return 0 if cold["correct"] and following["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
