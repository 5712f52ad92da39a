"""Workloads beyond the side-by-side read: Dask's own placement, and data bigger than the cache.

- :func:`dependent`: an xarray dataset (3 variables) reduced with ``groupby("time.month")``
  and a 7-day moving mean (``map_overlap``), with locality on and off: wall time per pass
  and the bytes Dask moved between workers (its own transfer counters).
- :func:`bigger_than_cache`: a dataset twice the cluster's total ``max_size`` read in 4
  full passes, then a skewed read (80% of reads on 20% of the chunks), under each
  replacement policy: the share of reads the cache served, S3 GETs per chunk per pass,
  and the most bytes any worker held against its budget.

Each setting runs on a cluster of its own, so one cannot warm the other.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from distributed import Client
from zarr.storage import LocalStore

from benchmarks import _report, _stores
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats
from dask_zarr_cache.testing import loopback_cluster

if TYPE_CHECKING:
    from benchmarks._s3 import ParallelS3Server

DEPENDENT, LARGE = "work/dependent.zarr", "work/large.zarr"


def write_datasets(root: Path, side: int, chunk: int) -> dict[str, Any]:
    """The two datasets, as objects under ``root`` for the S3 snapshot."""
    rng = np.random.default_rng(2)
    time_axis = pd.date_range("2020-01-01", periods=730, freq="D")
    ds = xr.Dataset(
        {
            name: (("time", "y", "x"), rng.random((730, 32, 32), dtype="f4"))
            for name in ("tas", "pr", "wind")
        },
        coords={"time": time_axis},
    )
    ds.to_zarr(
        LocalStore(root / DEPENDENT),
        encoding={v: {"chunks": (30, 16, 16)} for v in ds.data_vars},
        zarr_format=3,
        consolidated=False,
    )
    large = rng.random((side, side), dtype="f4")
    zarr.create_array(LocalStore(root / LARGE), data=large, chunks=(chunk, chunk))
    return {
        "dependent_chunks": len(ds.data_vars) * -(-730 // 30) * (32 // 16) ** 2,
        "large_bytes": large.nbytes,
        "large_chunks": (side // chunk) ** 2,
        "large_sum": float(large.astype("f8").sum()),
    }


def _weekly_mean(block: np.ndarray) -> np.ndarray:
    """7-day centred moving mean along axis 0 (the first and last 3 days kept as they are)."""
    total = np.cumsum(block, axis=0, dtype="f8")
    out = block.astype("f8")
    out[3:-3] = (total[6:] - np.concatenate([np.zeros_like(total[:1]), total[:-7]])) / 7
    return out


def _transfer_bytes(client: Client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


@dataclass
class DependentResult:
    """One locality setting of the dependent workload."""

    locality: bool
    seconds: list[float]
    transfer_mib: list[float]


def dependent(s3: ParallelS3Server, workers: int, passes: int, locality: bool) -> DependentResult:
    """``groupby("time.month").mean()`` and a 7-day moving mean, ``passes`` times."""
    options = tuple(sorted(s3.storage_options.items()))
    result = DependentResult(locality, [], [])
    with (
        dask.config.set({"zarr-cache.locality": locality}),
        loopback_cluster(workers, 1) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ZarrCachePlugin(max_size="4GiB"))
        store = ClusterCacheStore(_stores.plain(f"s3://{DEPENDENT}", options))
        for _ in range(passes):
            ds = xr.open_zarr(store, consolidated=False)
            monthly = ds.groupby("time.month").mean()
            weekly = [
                ds[v]
                .data.map_overlap(_weekly_mean, depth={0: 3, 1: 0, 2: 0}, boundary="reflect")
                .mean(axis=0)
                for v in ds.data_vars
            ]
            before = _transfer_bytes(client)
            start = time.perf_counter()
            dask.compute(monthly, weekly)
            result.seconds.append(time.perf_counter() - start)
            result.transfer_mib.append((_transfer_bytes(client) - before) / 2**20)
    return result


@dataclass
class PolicyResult:
    """One replacement policy on data bigger than the cache."""

    policy: str
    served: list[float]  #: share of reads served by the cache (own disk or a peer), per pass
    gets_per_chunk: list[float]  #: S3 GETs per chunk, per pass
    hot_served: float  #: share of the hot chunks' reads the cache served (skewed phase)
    cold_served: float  #: the same for the other chunks
    max_used_share: float  #: most bytes one worker held / its max_size, over all passes


def cache_reads(before: dict[str, int], after: dict[str, int]) -> tuple[int, int, int]:
    """Reads between two ``cluster_stats(...)["total"]``: own disk, from a peer, from S3."""
    hits, peer, remote = (after[k] - before[k] for k in ("hits", "peer_reads", "remote_reads"))
    return hits, peer, remote


def _served(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    hits, peer, remote = cache_reads(before, after)
    return hits + peer, hits + peer + remote


def _max_used_share(client: Client, max_size: int) -> float:
    workers = cluster_stats(client)["workers"]
    return max(w["bytes"] for w in workers.values()) / max_size


def bigger_than_cache(
    s3: ParallelS3Server, info: dict[str, Any], workers: int, policy: str
) -> PolicyResult:
    """4 full passes over twice the total budget, then a skewed phase."""
    options = tuple(sorted(s3.storage_options.items()))
    max_size = info["large_bytes"] // (2 * workers)
    result = PolicyResult(policy, [], [], 0.0, 0.0, 0.0)
    with (
        dask.config.set({"zarr-cache.policy": policy, "zarr-cache.flush-interval": "100ms"}),
        loopback_cluster(workers, 1) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ZarrCachePlugin(max_size=max_size))
        arr = zarr.open_array(ClusterCacheStore(_stores.plain(f"s3://{LARGE}", options)), mode="r")
        chunk_gets = _ChunkGets(s3)
        for _ in range(4):
            before = cluster_stats(client)["total"]
            x = da.from_zarr(arr, name=f"large-{uuid.uuid4().hex}").astype("f8").sum()
            total = float(client.compute(x).result())
            assert abs(total - info["large_sum"]) <= 1e-6 * abs(info["large_sum"])
            time.sleep(0.3)  # let the last commits land
            served, reads = _served(before, cluster_stats(client)["total"])
            result.served.append(served / reads)
            result.gets_per_chunk.append(chunk_gets.since_last() / info["large_chunks"])
            result.max_used_share = max(result.max_used_share, _max_used_share(client, max_size))
        result.hot_served, result.cold_served = _skewed(client, arr)
        result.max_used_share = max(result.max_used_share, _max_used_share(client, max_size))
    return result


def _skewed(client: Client, arr: zarr.Array, rounds: int = 6) -> tuple[float, float]:
    """80% of reads on 20% of the chunks; served share of hot and of other reads (last half)."""
    x = da.from_zarr(arr)
    blocks = list(np.ndindex(*x.numblocks))
    rng = random.Random(3)
    hot = rng.sample(blocks, len(blocks) // 5)
    hot_set = set(hot)
    cold = [b for b in blocks if b not in hot_set]
    counts = {True: [0, 0], False: [0, 0]}
    for round_ in range(rounds):
        picks = [rng.choice(hot) if rng.random() < 0.8 else rng.choice(cold) for _ in blocks]
        for is_hot in (True, False):
            chosen = [b for b in picks if (b in hot_set) == is_hot]
            before = cluster_stats(client)["total"]
            dask.compute(*[x.blocks[b].sum() for b in chosen], scheduler=client)
            time.sleep(0.3)
            served, reads = _served(before, cluster_stats(client)["total"])
            if round_ >= rounds // 2:  # after the hot set had its chance to settle
                counts[is_hot][0] += served
                counts[is_hot][1] += reads
    return counts[True][0] / counts[True][1], counts[False][0] / counts[False][1]


class _ChunkGets:
    """S3 GETs of the large dataset's chunks since the last call, counted at the server."""

    def __init__(self, s3: ParallelS3Server) -> None:
        self._s3 = s3
        self._last = self._count()

    def _count(self) -> int:
        return sum(n for k, n in self._s3.object_gets.items() if k.startswith(LARGE + "/c/"))

    def since_last(self) -> int:
        now = self._count()
        delta, self._last = now - self._last, now
        return delta


def dependent_markdown(results: list[DependentResult]) -> str:
    """Locality on/off side by side."""
    header = ["locality", "pass 1 (cold) s", "warm passes s (median)"]
    header += ["Dask transfers MiB, pass 1", "Dask transfers MiB, warm (median)"]
    rows = (
        [
            "on" if r.locality else "off",
            f"{r.seconds[0]:.2f}",
            f"{np.median(r.seconds[1:]):.2f}",
            f"{r.transfer_mib[0]:.1f}",
            f"{np.median(r.transfer_mib[1:]):.1f}",
        ]
        for r in results
    )
    on, off = (next(r for r in results if r.locality is flag) for flag in (True, False))
    ratio = np.median(on.seconds[1:]) / np.median(off.seconds[1:])
    return _report.table(header, rows) + f"\n\nWarm wall time, locality on / off: **{ratio:.2f}**."


def policy_markdown(results: list[PolicyResult]) -> str:
    """Replacement policies side by side on data bigger than the cache."""
    header = ["policy", "served by the cache, passes 1-4", "S3 GETs per chunk, passes 1-4"]
    header += ["skewed: hot reads served", "skewed: other reads served"]
    header += ["max bytes held / max_size"]
    rows = (
        [
            r.policy,
            " / ".join(f"{s:.0%}" for s in r.served),
            " / ".join(f"{g:.2f}" for g in r.gets_per_chunk),
            f"{r.hot_served:.0%}",
            f"{r.cold_served:.0%}",
            f"{r.max_used_share:.2f}",
        ]
        for r in results
    )
    return _report.table(header, rows)
