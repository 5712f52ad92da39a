"""``dask-zarr-cache demo``: the main job on embedded defaults.

Starts a loopback S3 server (moto) with a generated dataset and a local multi-process
Dask cluster, then reads the dataset pass after pass: once without the cache as a
baseline, then through ``ClusterCacheStore``.  GETs are counted at the S3 server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from distributed import Client
    from zarr.abc.store import Store

    from dask_zarr_cache.testing import LocalS3Server

__all__ = ["DemoOptions", "PassResult", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """Knobs of the demo (all have embedded defaults)."""

    workers: int = 3
    threads_per_worker: int = 2
    passes: int = 3
    side: int = 2048  #: the array is ``side x side`` float32
    chunk: int = 256
    latency_ms: float = 20.0  #: added to every S3 request, like a real region away
    max_size: str = "1GiB"
    linger: float = 0.0  #: seconds to keep the cluster up afterwards (for the dashboard)


@dataclass(frozen=True)
class PassResult:
    """What one read pass cost."""

    label: str
    seconds: float
    remote_gets: int
    peer_reads: int
    local_hits: int
    correct: bool


def _chunk_gets(s3: LocalS3Server, prefix: str) -> int:
    return sum(n for k, n in s3.object_gets.items() if k.startswith(prefix) and "/c/" in k)


def _timed_pass(
    label: str, read: Callable[[], float], expected: float, s3: LocalS3Server, client: Client
) -> PassResult:
    from dask_zarr_cache import cluster_stats

    prefix = "demo/data.zarr/"
    gets0, stats0 = _chunk_gets(s3, prefix), cluster_stats(client)["total"]
    start = time.perf_counter()
    total = read()
    seconds = time.perf_counter() - start
    stats1 = cluster_stats(client)["total"]
    return PassResult(
        label=label,
        seconds=seconds,
        remote_gets=_chunk_gets(s3, prefix) - gets0,
        peer_reads=stats1["peer_reads"] - stats0["peer_reads"],
        local_hits=stats1["hits"] - stats0["hits"],
        correct=abs(total - expected) <= 1e-6 * abs(expected),
    )


def format_table(results: list[PassResult]) -> str:
    """Render pass results as a fixed-width table."""
    header = f"{'pass':<18}{'wall s':>8}{'S3 GETs':>9}{'peer reads':>12}{'local hits':>12}  ok"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.label:<18}{r.seconds:>8.2f}{r.remote_gets:>9}{r.peer_reads:>12}"
            f"{r.local_hits:>12}  {'yes' if r.correct else 'NO'}"
        )
    return "\n".join(lines)


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> list[PassResult]:
    """Run the demo and return one :class:`PassResult` per pass."""
    import dask.array as da
    import numpy as np
    import zarr
    from distributed import Client
    from zarr.storage import FsspecStore

    from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin
    from dask_zarr_cache.testing import LocalS3Server, loopback_cluster

    with LocalS3Server() as s3:
        s3.create_bucket("demo")
        opts = s3.storage_options  # fsspec defaults, as users have them
        source = FsspecStore.from_url("s3://demo/data.zarr", storage_options=opts)
        data = np.random.default_rng(0).random((options.side, options.side), dtype="f4")
        arr = zarr.create_array(
            source, shape=data.shape, chunks=(options.chunk, options.chunk), dtype="f4"
        )
        arr[...] = data
        expected = float(data.astype("f8").sum())
        n_chunks = arr.nchunks
        echo(
            f"dataset: s3://demo/data.zarr at {s3.endpoint_url}, {data.nbytes / 2**20:.0f} MiB "
            f"in {n_chunks} chunks; S3 latency {options.latency_ms:g} ms per request"
        )
        s3.latency = options.latency_ms / 1000
        with (
            loopback_cluster(options.workers, options.threads_per_worker) as cluster,
            Client(cluster) as client,
        ):
            client.register_plugin(ZarrCachePlugin(max_size=options.max_size))
            echo(f"cluster: {options.workers} workers; dashboard {client.dashboard_link}")
            read_only = FsspecStore.from_url(
                "s3://demo/data.zarr", read_only=True, storage_options=opts
            )

            def reader(store: Store) -> Callable[[], float]:
                def read() -> float:
                    x = da.from_zarr(zarr.open_array(store, mode="r")).astype("f8")
                    return float(client.compute(x.sum()).result())

                return read

            # Unreported warm-up: imports and S3 sessions in every worker process, so the
            # baseline below is not charged for them.
            reader(read_only)()
            results = [_timed_pass("no cache", reader(read_only), expected, s3, client)]
            cached = reader(ClusterCacheStore(read_only))
            for i in range(options.passes):
                label = "cache, cold" if i == 0 else f"cache, warm {i}"
                results.append(_timed_pass(label, cached, expected, s3, client))
            echo(format_table(results))
            saved = sum(r.remote_gets for r in results[:1]) * options.passes - sum(
                r.remote_gets for r in results[1:]
            )
            echo(f"{n_chunks} chunks; S3 GETs avoided over {options.passes} cached passes: {saved}")
            if options.linger:
                echo(f"cluster stays up {options.linger:g} s: {client.dashboard_link}")
                time.sleep(options.linger)
            client.run(close_s3_sessions)
        close_s3_sessions()
    return results


def close_s3_sessions() -> None:
    """Close the HTTP sessions of every s3fs filesystem in this process.

    zarr opens s3fs asynchronously, and s3fs closes such sessions only when told to:
    otherwise aiohttp warns "Unclosed client session" at exit.  They live on zarr's loop.
    """
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if client is not None and fs.asynchronous:
            fs._s3 = None
            sync(client.__aexit__(None, None, None))
