"""Tiny chunks from a free source: the cache's own cost per chunk, and the index's load.

20,000 chunks of 1 KiB (float32, zarr chunks 16 x 16, no compressor) in a ``LocalStore``,
read by Dask tasks of 100 chunks each (dask chunks 160 x 160). The source costs almost
nothing, so what the cache adds per chunk (index messages, file writes, bookkeeping)
shows undiluted. The no-cache path (the ``LocalStore`` itself) and the cache over it run
interleaved pass by pass on one fresh cluster; the cache's first pass is its cold one.
The index's decisions per second are the keys its shards decided during the cold pass
(``cluster_stats(client)["index"]["decisions"]``) over the pass's wall time: the load the
real read path puts on the index, not a load generator's.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import zarr
from distributed import Client
from zarr.storage import LocalStore

from benchmarks import _breakdown, _report
from benchmarks._report import Spread
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats
from dask_zarr_cache.testing import loopback_cluster

if TYPE_CHECKING:
    from pathlib import Path

#: float32 (3200, 1600) in 16 x 16 chunks: 20,000 chunks of 1 KiB; 100 chunks per task.
SHAPE, CHUNK, TASK_CHUNK = (3200, 1600), (16, 16), (160, 160)
CHUNKS_PER_TASK = (TASK_CHUNK[0] // CHUNK[0]) * (TASK_CHUNK[1] // CHUNK[1])
NO_CACHE, OURS = "no cache (LocalStore)", "dask-zarr-cache over LocalStore"


@dataclass
class TinyResult:
    """Both paths' passes, the index's counters over the cache's cold pass, and timings."""

    n_chunks: int
    passes: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cold_decisions: int = 0
    cold_asks: int = 0
    times: list[_breakdown.PassTime] = field(default_factory=list)
    correct: bool = True

    @property
    def decisions_per_second(self) -> float:
        """Keys the index decided per second of the cache's cold pass."""
        return self.cold_decisions / self.seconds[OURS][0]

    @property
    def keys_per_message(self) -> float:
        """Keys per acquire message during the cold pass."""
        return self.cold_decisions / max(1, self.cold_asks)


def write(root: Path, shape: tuple[int, int]) -> tuple[str, float]:
    """The tiny-chunk array under ``root``; its path and its sum."""
    data = np.random.default_rng(4).random(shape, dtype="f4")
    path = str(root / "tiny.zarr")
    zarr.create_array(LocalStore(path), data=data, chunks=CHUNK, compressors=None)
    return path, float(data.astype("f8").sum())


def _index_counts(client: Client) -> tuple[int, int]:
    index = cluster_stats(client)["index"]
    return index["decisions"], index["asks"]


def _one_pass(store: object, client: Client) -> tuple[float, float]:
    arr = zarr.open_array(store, mode="r")
    x = da.from_zarr(arr, chunks=TASK_CHUNK, name=f"tiny-{uuid.uuid4().hex}")
    start = time.perf_counter()
    total = float(client.compute(x.astype("f8").sum()).result())
    return time.perf_counter() - start, total


def run(root: Path, workers: int, passes: int, shape: tuple[int, int] = SHAPE) -> TinyResult:
    """``passes`` passes of each path, interleaved, on a cluster of its own."""
    path, expected = write(root, shape)
    warmup = np.random.default_rng(5).random((320, 320), dtype="f4")
    warmup_path = str(root / "tiny-warmup.zarr")
    zarr.create_array(LocalStore(warmup_path), data=warmup, chunks=CHUNK, compressors=None)
    n_chunks = (shape[0] // CHUNK[0]) * (shape[1] // CHUNK[1])
    result = TinyResult(n_chunks, passes, {NO_CACHE: [], OURS: []})
    with loopback_cluster(workers, 1) as cluster, Client(cluster) as client:
        client.register_plugin(ZarrCachePlugin(max_size="4GiB"))
        for store in (LocalStore(warmup_path), ClusterCacheStore(LocalStore(warmup_path))):
            _one_pass(store, client)  # untimed: imports and the index in every process
        stores = {
            NO_CACHE: LocalStore(path, read_only=True),
            OURS: ClusterCacheStore(LocalStore(path, read_only=True)),
        }
        for i in range(passes):
            for name, store in stores.items():
                ours = name == OURS
                counts0 = _index_counts(client)
                (seconds, total), times = _breakdown.measured(
                    client,
                    f"{name}, pass {i + 1}",
                    n_chunks,
                    lambda store=store: _one_pass(store, client),
                    ours,
                )
                if ours and i == 0:
                    decisions, asks = _index_counts(client)
                    result.cold_decisions = decisions - counts0[0]
                    result.cold_asks = asks - counts0[1]
                if i < 2:
                    result.times.append(times)
                result.seconds[name].append(seconds)
                result.correct &= abs(total - expected) <= 1e-6 * abs(expected)
            print(
                f"  tiny chunks pass {i + 1}: "
                + ", ".join(f"{n} {s[-1]:.2f}" for n, s in result.seconds.items())
                + " s",
                flush=True,
            )
    return result


def ratios(result: TinyResult) -> dict[str, Spread | float]:
    """Cold and warm against no cache (median, min-max), and the index's load."""
    ours, nocache = result.seconds[OURS], result.seconds[NO_CACHE]
    return {
        "cold pass / no-cache pass": Spread.of(ours[0] / s for s in nocache),
        "warm pass / no-cache pass": Spread.paired(ours[1:], nocache[1:]),
        "index decisions/s during the cold pass": result.decisions_per_second,
        "keys per index message during the cold pass": result.keys_per_message,
    }


def markdown(result: TinyResult) -> str:
    """Both paths' passes, the ratios, and where the time of the first two passes went."""
    about = (
        f"{result.n_chunks:,} chunks of 1 KiB (no compressor) in a `LocalStore`, "
        f"{CHUNKS_PER_TASK} per task, {result.passes} passes per path interleaved on a "
        "fresh cluster: a free source, so the cache's own cost per chunk shows."
    )
    rows = (
        [name, f"{s[0]:.2f}", Spread.of(s[1:]), "yes" if result.correct else "NO"]
        for name, s in result.seconds.items()
    )
    table = _report.table(["read path", "pass 1 s", "passes 2+ s", "ok"], rows)
    lines = [
        f"- {k}: **{v}**" if isinstance(v, Spread) else f"- {k}: **{v:,.1f}**"
        for k, v in ratios(result).items()
    ]
    return "\n\n".join([about, table, "\n".join(lines), _breakdown.markdown(result.times)])
