"""Side-by-side benchmark: every read path on the same data, cluster and S3 latency.

Usage::

    python -m benchmarks.run [--workers 4] [--passes 5] [--latency-ms 20] [--side 4096]
                             [--s3-processes N] [--name latest]

Every read path runs ``--passes`` passes (the first cold), the paths interleaved pass by
pass so that slow and fast moments of the machine fall on all of them alike; ratios are
medians of per-pass ratios with their min-max. S3 is :class:`benchmarks._s3.ParallelS3Server`,
whose own service time is measured and printed. Writes ``benchmarks/results/<name>.md``
and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from distributed import Client
from zarr.storage import LocalStore

from benchmarks import _breakdown, _micro, _report, _stores, _tiny, _traces, _workloads
from benchmarks._report import Spread
from benchmarks._s3 import ParallelS3Server, ServiceTimes
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats, warm
from dask_zarr_cache.core.names import POLICIES
from dask_zarr_cache.testing import loopback_cluster

RESULTS = Path(__file__).parent / "results"
BUCKET, PATH, COPY = "bench", "bench/data.zarr", "bench/copy.zarr"
#: the same data again, for the cache over ObjectStore: a source's key is where its bytes
#: live, so over the same objects it would find the other cache path's copies
OBSTORE_COPY = "bench/obstore.zarr"
WARMUP = "bench/warmup.zarr"  #: a few chunks, read untimed through every path first
NO_CACHE, ONE_GET = "no cache (FsspecStore)", "no cache (ObjectStore, one GET)"
OURS, OURS_ONE_GET = "dask-zarr-cache", "dask-zarr-cache over ObjectStore"
FLOOR = "floor: worker-local LocalStore"


@dataclass
class PathResult:
    """Measurements of one read path over all its passes."""

    name: str
    n_chunks: int
    seconds: list[float] = field(default_factory=list)
    chunk_gets: list[int] = field(default_factory=list)
    chunk_heads: list[int] = field(default_factory=list)
    source_bytes: list[int] = field(default_factory=list)
    #: dask-zarr-cache only: per pass, the share of cache reads from the reader's own disk
    local_share: list[float] = field(default_factory=list)
    times: list[_breakdown.PassTime] = field(default_factory=list)
    correct: bool = True

    @property
    def gets_per_chunk(self) -> float:
        return sum(self.chunk_gets) / self.n_chunks

    @property
    def heads_per_chunk(self) -> float:
        return sum(self.chunk_heads) / self.n_chunks

    @property
    def warm(self) -> list[float]:
        return self.seconds[1:]


def _chunk_requests(counts: dict[str, Any], dataset: str) -> Counter[str]:
    """Requests for ``dataset``'s chunks in ``counts`` (a server snapshot), per HTTP method."""
    per_method: Counter[str] = Counter()
    for (method, path), n in counts["requests"].items():
        if path.startswith(dataset + "/c/"):
            per_method[method] += n
    return per_method


def _read_pass(store: object, client: Client, expected: float | None) -> tuple[float, bool]:
    arr = zarr.open_array(store, mode="r")
    x = da.from_zarr(arr, name=f"bench-{uuid.uuid4().hex}").astype("f8").sum()
    start = time.perf_counter()
    total = float(client.compute(x).result())
    seconds = time.perf_counter() - start
    return seconds, expected is None or abs(total - expected) <= 1e-6 * abs(expected)


def _copy_to_floor(source: str, root: str) -> None:
    """Copy the dataset to this process's floor directory (untimed)."""
    shutil.copytree(source, _stores.worker_dir(root, "floor"), dirs_exist_ok=True)


def write_dataset(args: argparse.Namespace, root: Path) -> tuple[np.ndarray, dict]:
    """The dataset, and a copy for ``warm()``, as buckets under ``root`` for the S3 snapshot."""
    data = np.random.default_rng(0).random((args.side, args.side), dtype="f4")
    for path in (PATH, COPY, OBSTORE_COPY):
        arr = zarr.create_array(
            LocalStore(root / path), shape=data.shape, chunks=(args.chunk,) * 2, dtype="f4"
        )
        arr[...] = data
    warmup = data[: 2 * args.chunk, : 2 * args.chunk]
    zarr.create_array(LocalStore(root / WARMUP), data=warmup, chunks=(args.chunk,) * 2)
    info = {
        "n_chunks": arr.nchunks,
        "chunk_bytes": args.chunk * args.chunk * 4,
        "dataset_mib": data.nbytes / 2**20,
    }
    return data, info


def _local_share(before: dict, after: dict) -> float:
    """Share of the cache's reads (own disk or a peer) served from the reader's own disk."""
    hits, peers, _ = _workloads.cache_reads(before, after)
    return hits / (hits + peers) if hits + peers else 0.0


def _read_paths(
    options: tuple, scratch: str, dataset: str | None = None
) -> dict[str, tuple[object, str]]:
    """Every read path by name, with the dataset it reads (``dataset`` for all, if given)."""

    def over(factory: Any, own: str = PATH) -> tuple[object, str]:
        path = dataset or own
        return factory(f"s3://{path}", options), path

    def per_process(factory: Any, *args: Any) -> Any:
        return lambda url, options: _stores.PerProcessStore(factory, url, options, *args)

    return {
        NO_CACHE: over(per_process(_stores.plain)),
        ONE_GET: over(per_process(_stores.one_get)),
        "zarr CacheStore per worker": over(per_process(_stores.zarr_cache_store, scratch)),
        "fsspec simplecache per worker": over(per_process(_stores.fsspec_simplecache, scratch)),
        OURS: over(lambda url, options: ClusterCacheStore(_stores.plain(url, options))),
        OURS_ONE_GET: over(
            lambda url, options: ClusterCacheStore(_stores.one_get(url, options)), OBSTORE_COPY
        ),
        FLOOR: (_stores.PerProcessStore(_stores.local_floor, scratch), dataset or PATH),
    }


def run_paths(
    args: argparse.Namespace, scratch: str, s3: ParallelS3Server, data: np.ndarray, info: dict
) -> list[PathResult]:
    """Run every read path, interleaved, for ``args.passes`` passes on one cluster."""
    source = Path(scratch) / "source"
    expected = float(data.astype("f8").sum())
    with (
        loopback_cluster(args.workers, args.threads) as cluster,
        Client(cluster) as client,
    ):
        options = tuple(sorted(s3.storage_options.items()))
        client.register_plugin(ZarrCachePlugin(max_size="4GiB"))
        # The floor's data, untimed: on every worker, and in this process, which opens
        # the array's metadata before submitting the reads.
        warmup_scratch = str(Path(scratch) / "warmup")
        for dataset, root in ((PATH, scratch), (WARMUP, warmup_scratch)):
            client.run(_copy_to_floor, str(source / dataset), root)
            _copy_to_floor(str(source / dataset), root)
        stores = _read_paths(options, scratch)
        # Warm-up, untimed: imports, S3 sessions and the cache's index in every worker
        # process, on a small dataset of its own, through every path.
        s3.latency = 0
        warmup = _read_paths(options, warmup_scratch, WARMUP)
        for store, _ in warmup.values():
            _read_pass(store, client, None)
        s3.latency = args.latency_ms / 1000
        s3.reset_counts()
        results = {name: PathResult(name, info["n_chunks"]) for name in stores}
        for i in range(args.passes):
            for name, (store, dataset) in stores.items():
                ours = isinstance(store, ClusterCacheStore)
                counts0 = s3.counts()
                cache0 = cluster_stats(client)["total"] if ours else {}
                label = f"{name}, pass {i + 1}"
                (seconds, ok), times = _breakdown.measured(
                    client,
                    label,
                    info["n_chunks"],
                    lambda store=store: _read_pass(store, client, expected),
                    ours,
                )
                counts = s3.counts()
                requests = _chunk_requests(counts, dataset) - _chunk_requests(counts0, dataset)
                result = results[name]
                if ours:
                    cache = cluster_stats(client)["total"]
                    result.local_share.append(_local_share(cache0, cache))
                result.seconds.append(seconds)
                result.times.append(times)
                result.chunk_gets.append(requests["GET"])
                result.chunk_heads.append(requests["HEAD"])
                result.source_bytes.append(counts["bytes_sent"] - counts0["bytes_sent"])
                result.correct &= ok
            print(
                f"  pass {i + 1}: "
                + ", ".join(
                    f"{name.split(':')[0]} {r.seconds[-1]:.2f}" for name, r in results.items()
                )
                + " s",
                flush=True,
            )
        info["s3"] = s3.service_times()
        print(f"  {info['s3']}", flush=True)
        report = warm(
            client, ClusterCacheStore(_stores.plain(f"s3://{COPY}", options)), progress=False
        )
        print(f"  warm(): {report}", flush=True)
        info["warm"] = {"seconds": report.seconds, "gets": report.gets, "chunks": report.chunks}
    return list(results.values())


def run_workloads(args: argparse.Namespace, s3: ParallelS3Server, info: dict) -> list[str]:
    """The locality and replacement-policy workloads, as report sections."""
    dependent = []
    for locality in (True, False):
        dependent.append(_workloads.dependent(s3, args.workers, args.passes, locality))
        print(f"  dependent workload: {dependent[-1]}", flush=True)
    policies = []
    for policy in POLICIES:
        policies.append(_workloads.bigger_than_cache(s3, info, args.workers, policy))
        print(f"  bigger than the cache: {policies[-1]}", flush=True)
    return [
        "## Dask's own placement",
        f"An xarray dataset of 3 variables in {info['dependent_chunks']} chunks through the "
        'cache: `groupby("time.month").mean()` and a 7-day moving mean (`map_overlap`), '
        f"{args.passes} passes on a fresh cluster per setting.",
        _workloads.dependent_markdown(dependent),
        "## Bigger than the cache",
        f"{info['large_bytes'] / 2**20:.0f} MiB in {info['large_chunks']} chunks, twice the "
        f"cluster's total `max_size`, read in 4 full passes; then 6 rounds of skewed reads "
        "(80% on a fixed 20% of the chunks; served shares over the last 3 rounds).",
        _workloads.policy_markdown(policies),
        "## Replacement policy on traces",
        _traces.policy_markdown(),
    ]


def ratios(results: list[PathResult]) -> dict[str, Spread | float]:
    """The target ratios, each the median (min-max) of per-pass ratios.

    Warm ratios pair pass ``i`` of one path with pass ``i`` of the other (they ran next
    to each other); the cold pass, run once, is set against every no-cache pass.
    """
    by = {r.name: r for r in results}
    nocache, one_get, ours = by[NO_CACHE], by[ONE_GET], by[OURS]
    floor, ours_one_get = by[FLOOR], by[OURS_ONE_GET]
    return {
        "remote GETs per unique chunk (dask-zarr-cache)": ours.gets_per_chunk,
        "cold pass / one-GET no-cache pass (ObjectStore)": Spread.of(
            [ours.seconds[0] / s for s in one_get.seconds]
        ),
        "cold pass over ObjectStore / one-GET no-cache pass": Spread.of(
            [ours_one_get.seconds[0] / s for s in one_get.seconds]
        ),
        "cold pass / no-cache pass (FsspecStore)": Spread.of(
            [ours.seconds[0] / s for s in nocache.seconds]
        ),
        "warm pass / floor pass": Spread.paired(ours.warm, floor.warm),
        "warm pass / no-cache pass": Spread.paired(ours.warm, nocache.warm),
        "warm-pass cache reads from the reader's own disk": Spread.of(ours.local_share[1:]),
    }


def breakdown_markdown(results: list[PathResult]) -> str:
    """Where the time of the no-cache, cold and warm passes went."""
    by = {r.name: r for r in results}
    return _breakdown.markdown(
        [
            by[ONE_GET].times[0],
            by[OURS_ONE_GET].times[0],
            by[OURS].times[0],
            by[OURS_ONE_GET].times[1],
            by[FLOOR].times[1],
        ]
    )


def paths_markdown(results: list[PathResult]) -> str:
    """The side-by-side table as markdown."""
    header = ["read path", "pass 1 (cold) s", "warm passes s: median (min-max)"]
    header += ["GETs / unique chunk", "HEADs / unique chunk", "MiB from S3", "ok"]
    return _report.table(
        header,
        (
            [
                r.name,
                f"{r.seconds[0]:.2f}",
                Spread.of(r.warm),
                f"{r.gets_per_chunk:.2f}",
                f"{r.heads_per_chunk:.2f}",
                f"{sum(r.source_bytes) / 2**20:.1f}",
                "yes" if r.correct else "NO",
            ]
            for r in results
        ),
    )


def ratios_markdown(measured: dict[str, Spread | float]) -> str:
    """The ratios as a markdown list."""
    return "\n".join(
        f"- {k}: **{v.median:.2f}** (min-max over passes {v.low:.2f}-{v.high:.2f})"
        if isinstance(v, Spread)
        else f"- {k}: **{v:.2f}**"
        for k, v in measured.items()
    )


def plot(results: list[PathResult], path: Path) -> None:
    """Cold pass and warm-pass median (min-max bars) per read path, and GETs per chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_gets) = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(results))
    warm = [Spread.of(r.warm) for r in results]
    ax_time.bar(x - 0.2, [r.seconds[0] for r in results], 0.4, label="pass 1 (cold)")
    ax_time.bar(
        x + 0.2,
        [w.median for w in warm],
        0.4,
        yerr=[[w.median - w.low for w in warm], [w.high - w.median for w in warm]],
        capsize=3,
        label=f"warm passes (median, min-max of {len(results[0].warm)})",
    )
    labels = [r.name.replace(" per worker", "\nper worker").replace(": ", ":\n") for r in results]
    ax_time.set_xticks(x, labels, fontsize=8)
    ax_time.set_ylabel("wall time per pass (s)")
    ax_time.legend()
    ax_gets.bar(x, [r.gets_per_chunk for r in results], color="#d62728")
    ax_gets.set_xticks(x, labels, fontsize=8)
    ax_gets.set_ylabel("S3 GETs per unique chunk (all passes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run everything, print the tables, write ``benchmarks/results/<name>.*``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--passes", type=int, default=5, help="per read path, first is cold")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--side", type=int, default=4096, help="float32 array SIDE x SIDE")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument(
        "--s3-processes",
        type=int,
        default=max(2, (os.cpu_count() or 2) // 4),
        help="server processes of the S3 endpoint",
    )
    parser.add_argument("--micro-keys", default="1000,100000,1000000")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-workloads", action="store_true", help="locality and policy")
    parser.add_argument("--skip-tiny", action="store_true", help="the tiny-chunk workload")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--name", default="latest", help="report file names: NAME.md, NAME.png")
    args = parser.parse_args(argv)
    if args.passes < 2:
        parser.error("--passes must be at least 2 (one cold, one warm)")

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"benchmark {when}: {args.workers} workers x {args.passes} passes, "
        f"S3 latency {args.latency_ms:g} ms",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dzc-bench-") as scratch:
        source = Path(scratch) / "source"
        data, info = write_dataset(args, source)
        if not args.skip_workloads:
            info.update(_workloads.write_datasets(source, args.side // 2, args.chunk // 2))
        with ParallelS3Server(source, processes=args.s3_processes) as s3:
            results = run_paths(args, scratch, s3, data, info)
            s3.latency = args.latency_ms / 1000
            workloads = [] if args.skip_workloads else run_workloads(args, s3, info)
        if not args.skip_tiny:
            tiny = _tiny.run(Path(scratch), args.workers, args.passes)
            workloads += ["## Tiny chunks", _tiny.markdown(tiny)]
    service: ServiceTimes = info["s3"]
    sections = [
        f"# dask-zarr-cache benchmark ({when})",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Cluster: {args.workers} worker processes x {args.threads} thread. "
        f"Data: {info['dataset_mib']:.0f} MiB float32 in {info['n_chunks']} chunks "
        f"of {info['chunk_bytes'] // 1024} KiB (`--side {args.side} --chunk {args.chunk}`) on "
        f"moto's S3 protocol from {args.s3_processes} loopback server processes with "
        f"{args.latency_ms:g} ms added per request. Every path ran {args.passes} passes "
        "(the first cold), the paths interleaved pass by pass.",
        f"{service}.",
        "## Read paths",
        paths_markdown(results),
        "## Ratios",
        ratios_markdown(ratios(results)),
        "## Where the time goes",
        "Each worker thread's share of a pass, per chunk: no task running, task work "
        "outside the cache (zarr, decoding, the sum), and the cache's read path as its "
        "timing counters saw it (waiting for the source, the index, peers, writing the "
        "file, the rest).",
        breakdown_markdown(results),
        "## Warm-up",
        f"`warm()` of a copy of the dataset ({info['warm']['chunks']} objects, "
        f"{info['warm']['gets']} GETs): **{info['warm']['seconds']:.2f} s**, against "
        f"{next(r for r in results if r.name == 'dask-zarr-cache').seconds[0]:.2f} s for "
        "the cold pass through the cache it replaces.",
    ]
    sections += workloads
    if not args.skip_micro:
        keys = [int(k) for k in args.micro_keys.split(",")]
        sections += ["## Index", _micro.index_markdown(keys)]
        sections += ["## Peer transfer", _micro.peer_markdown()]
        sections += ["## Local hits", _micro.hits_markdown()]
    report = "\n\n".join(sections) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(report)
    plot(results, args.out / f"{args.name}.png")
    correct = all(r.correct for r in results) and (args.skip_tiny or tiny.correct)
    return 0 if correct else 1


if __name__ == "__main__":
    raise SystemExit(main())
