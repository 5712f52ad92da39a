"""Side-by-side benchmark: every read path on the same data, cluster and S3 latency.

Usage::

    python -m benchmarks.run [--workers 4] [--passes 3] [--latency-ms 20] [--side 4096]

Prints the tables and writes ``benchmarks/results/latest.md`` and ``latest.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from distributed import Client
from zarr.storage import FsspecStore

from benchmarks import _micro, _stores
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, warm
from dask_zarr_cache.testing import LocalS3Server, loopback_cluster

RESULTS = Path(__file__).parent / "results"
BUCKET, PATH = "bench", "bench/data.zarr"


@dataclass
class PathResult:
    """Measurements of one read path over all its passes."""

    name: str
    seconds: list[float] = field(default_factory=list)
    chunk_gets: list[int] = field(default_factory=list)
    source_bytes: list[int] = field(default_factory=list)
    correct: bool = True

    @property
    def gets_per_chunk(self) -> float:
        return sum(self.chunk_gets) / self.n_chunks

    n_chunks: int = 1


def _chunk_gets(s3: LocalS3Server) -> int:
    return sum(n for k, n in s3.object_gets.items() if k.startswith(PATH + "/c/"))


def _read_pass(store: object, client: Client, expected: float) -> tuple[float, bool]:
    arr = zarr.open_array(store, mode="r")
    x = da.from_zarr(arr, name=f"bench-{uuid.uuid4().hex}").astype("f8").sum()
    start = time.perf_counter()
    total = float(client.compute(x).result())
    return time.perf_counter() - start, abs(total - expected) <= 1e-6 * abs(expected)


def _copy_to_floor(url: str, options: tuple, root: str) -> int:
    """Copy every object of the dataset to this worker's floor directory (untimed)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    source = _stores.plain(url, options)
    target = Path(_stores.worker_dir(root, "floor"))

    async def copy() -> int:
        n = 0
        async for key in source.list():
            buf = await source.get(key, default_buffer_prototype())
            (target / key).parent.mkdir(parents=True, exist_ok=True)
            (target / key).write_bytes(buf.to_bytes())
            n += 1
        return n

    return sync(copy())


def run_paths(args: argparse.Namespace, scratch: str) -> tuple[list[PathResult], dict]:
    """Run every read path for ``args.passes`` passes on one cluster; return results."""
    with LocalS3Server() as s3:
        s3.create_bucket(BUCKET)
        options = tuple(sorted(s3.storage_options.items()))
        url = f"s3://{PATH}"
        data = np.random.default_rng(0).random((args.side, args.side), dtype="f4")
        arr = zarr.create_array(
            FsspecStore.from_url(url, storage_options=dict(options)),
            shape=data.shape,
            chunks=(args.chunk, args.chunk),
            dtype="f4",
        )
        arr[...] = data
        expected = float(data.astype("f8").sum())
        info = {
            "n_chunks": arr.nchunks,
            "chunk_bytes": args.chunk * args.chunk * 4,
            "dataset_mib": data.nbytes / 2**20,
        }
        s3.latency = args.latency_ms / 1000
        with (
            loopback_cluster(args.workers, args.threads) as cluster,
            Client(cluster) as client,
        ):
            client.register_plugin(ZarrCachePlugin(max_size="4GiB"))
            # The floor's data, untimed: on every worker, and in this process, which opens
            # the array's metadata before submitting the reads.
            client.run(_copy_to_floor, url, options, scratch)
            _copy_to_floor(url, options, scratch)
            paths = {
                "no cache (FsspecStore)": _stores.PerProcessStore(_stores.plain, url, options),
                "zarr CacheStore per worker": _stores.PerProcessStore(
                    _stores.zarr_cache_store, url, options, scratch
                ),
                "fsspec simplecache per worker": _stores.PerProcessStore(
                    _stores.fsspec_simplecache, url, options, scratch
                ),
                "dask-zarr-cache": ClusterCacheStore(_stores.plain(url, options)),
                "floor: worker-local LocalStore": _stores.PerProcessStore(
                    _stores.local_floor, scratch
                ),
            }
            # Warm-up, untimed: imports and S3 sessions in every worker process.
            _read_pass(paths["no cache (FsspecStore)"], client, expected)
            results = []
            for name, store in paths.items():
                result = PathResult(name, n_chunks=arr.nchunks)
                for _ in range(args.passes):
                    gets0, bytes0 = _chunk_gets(s3), s3.bytes_sent
                    seconds, ok = _read_pass(store, client, expected)
                    result.seconds.append(seconds)
                    result.chunk_gets.append(_chunk_gets(s3) - gets0)
                    result.source_bytes.append(s3.bytes_sent - bytes0)
                    result.correct &= ok
                results.append(result)
                print(f"  {name}: {[f'{s:.2f}' for s in result.seconds]} s", flush=True)
            info["warm"] = _time_warm(s3, client, data, args)
    return results, info


def _time_warm(s3: LocalS3Server, client: Client, data: np.ndarray, args) -> dict[str, float]:
    """``warm()`` of a second copy of the dataset: what it costs next to a cold pass."""
    s3.latency = 0
    url = f"s3://{PATH}-copy"
    options = tuple(sorted(s3.storage_options.items()))
    target = FsspecStore.from_url(url, storage_options=dict(options))
    zarr.create_array(target, shape=data.shape, chunks=(args.chunk,) * 2, dtype="f4")[...] = data
    s3.latency = args.latency_ms / 1000
    report = warm(client, ClusterCacheStore(_stores.plain(url, options)), progress=False)
    print(f"  warm(): {report}", flush=True)
    return {"seconds": report.seconds, "gets": report.gets, "chunks": report.chunks}


def ratios(results: list[PathResult]) -> dict[str, float]:
    """The target ratios of the issue, from measured times."""
    by = {r.name: r for r in results}
    nocache = np.mean(by["no cache (FsspecStore)"].seconds)
    ours = by["dask-zarr-cache"]
    floor = np.mean(by["floor: worker-local LocalStore"].seconds)
    return {
        "remote GETs per unique chunk (dask-zarr-cache)": ours.gets_per_chunk,
        "cold pass / no-cache pass": ours.seconds[0] / nocache,
        "warm pass / floor pass": float(np.mean(ours.seconds[1:])) / floor,
        "warm pass / no-cache pass": float(np.mean(ours.seconds[1:])) / nocache,
    }


def paths_markdown(results: list[PathResult], args: argparse.Namespace) -> str:
    """The side-by-side table as markdown."""
    head = "| read path | " + " | ".join(f"pass {i + 1} s" for i in range(args.passes))
    head += " | GETs / unique chunk | MiB from S3 | ok |"
    lines = [head, "|---" * (args.passes + 4) + "|"]
    for r in results:
        cells = " | ".join(f"{s:.2f}" for s in r.seconds)
        lines.append(
            f"| {r.name} | {cells} | {r.gets_per_chunk:.2f} | "
            f"{sum(r.source_bytes) / 2**20:.1f} | {'yes' if r.correct else 'NO'} |"
        )
    return "\n".join(lines)


def plot(results: list[PathResult], path: Path) -> None:
    """A grouped bar chart of pass times per read path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_gets) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(results[0].seconds)
    x = np.arange(len(results))
    for i in range(len(results[0].seconds)):
        ax_time.bar(x + i * width, [r.seconds[i] for r in results], width, label=f"pass {i + 1}")
    labels = [r.name.replace(" per worker", "\nper worker").replace(": ", ":\n") for r in results]
    ax_time.set_xticks(x + width, labels, fontsize=8)
    ax_time.set_ylabel("wall time per pass (s)")
    ax_time.legend()
    ax_gets.bar(x, [r.gets_per_chunk for r in results], color="#d62728")
    ax_gets.set_xticks(x, labels, fontsize=8)
    ax_gets.set_ylabel("S3 GETs per unique chunk (all passes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run everything, print the tables, write ``benchmarks/results/latest.*``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--side", type=int, default=4096, help="float32 array SIDE x SIDE")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--micro-keys", default="1000,100000,1000000")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/png go")
    args = parser.parse_args(argv)

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"benchmark {when}: {args.workers} workers x {args.passes} passes, "
        f"S3 latency {args.latency_ms:g} ms",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dzc-bench-") as scratch:
        results, info = run_paths(args, scratch)
    measured = ratios(results)
    sections = [
        f"# dask-zarr-cache benchmark ({when})",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Cluster: {args.workers} worker processes x {args.threads} thread, {args.passes} "
        f"passes. Data: {info['dataset_mib']:.0f} MiB float32 in {info['n_chunks']} chunks "
        f"of {info['chunk_bytes'] // 1024} KiB on moto's S3 server (loopback) with "
        f"{args.latency_ms:g} ms added per request.",
        "## Read paths",
        paths_markdown(results, args),
        "## Ratios",
        "\n".join(f"- {k}: **{v:.2f}**" for k, v in measured.items()),
        "## Warm-up",
        f"`warm()` of a second copy of the dataset ({info['warm']['chunks']} objects, "
        f"{info['warm']['gets']} GETs): **{info['warm']['seconds']:.2f} s**, against "
        f"{next(r for r in results if r.name == 'dask-zarr-cache').seconds[0]:.2f} s for "
        "the cold pass through the cache it replaces.",
    ]
    if not args.skip_micro:
        keys = [int(k) for k in args.micro_keys.split(",")]
        sections += ["## Index", _micro.index_markdown(keys)]
        sections += ["## Peer transfer", _micro.peer_markdown()]
    report = "\n\n".join(sections) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(report)
    plot(results, args.out / "latest.png")
    return 0 if all(r.correct for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
