"""Where a pass's time goes: idle between tasks, task work outside the cache, and the cache's parts.

Each worker thread's share of a pass (wall time x threads) is split, per chunk read, into:
the time no task ran (Dask's task stream), task time outside the cache's read path (zarr,
decoding, the reduction), and within the read path, as the workers' own timing counters
(``*_us`` of :class:`~dask_zarr_cache.worker.counters.CacheCounters`) record it: waiting
for the source, the index, peers, writing the file, and the rest (bookkeeping,
event-loop hops, reading files of hits). Concurrent reads' waits are shared out over the
time a read was in flight (see :meth:`PassTime.per_chunk_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed import get_task_stream

from benchmarks import _report
from dask_zarr_cache import cluster_stats

if TYPE_CHECKING:
    from collections.abc import Callable

    from distributed import Client

#: The cache's timing counters of the read path, and what the table calls them.
CACHE_PARTS = {
    "source_wait_us": "source",
    "index_wait_us": "index",
    "peer_wait_us": "peer",
    "file_write_us": "file write",
}


@dataclass(frozen=True)
class PassTime:
    """One pass's wall time, its tasks' running time and the cache's timing counters."""

    label: str
    wall: float
    threads: int  #: worker threads of the cluster
    chunks: int
    busy: float  #: seconds tasks ran, summed over threads
    cache: dict[str, float] = field(default_factory=dict)  #: seconds per counter, summed

    def per_chunk_ms(self) -> dict[str, float]:
        """Thread time per chunk (ms): idle, outside the cache, and the cache's parts.

        A task's reads overlap (zarr reads a selection's chunks concurrently): the time
        with a read in the cache is ``read_busy_us``, and the summed waits of the
        concurrent reads (``read_us`` and its parts) share it out in proportion.
        """
        scale = 1000 / self.chunks
        parts = {"thread time": self.wall * self.threads * scale}
        parts["idle (no task)"] = (self.wall * self.threads - self.busy) * scale
        in_cache = self.cache.get("read_busy_us", 0.0)
        parts["task outside the cache"] = (self.busy - in_cache) * scale
        summed = self.cache.get("read_us", 0.0)
        share = in_cache / summed if summed else 0.0
        named = 0.0
        for counter, name in CACHE_PARTS.items():
            seconds = self.cache.get(counter, 0.0) * share
            parts[f"cache: {name}"] = seconds * scale
            named += seconds
        parts["cache: the rest"] = (in_cache - named) * scale
        return parts


def _cache_seconds(client: Client) -> dict[str, float]:
    total = cluster_stats(client)["total"]
    return {k: total[k] / 1e6 for k in ("read_us", "read_busy_us", *CACHE_PARTS)}


def measured(
    client: Client, label: str, chunks: int, run: Callable[[], Any], cache: bool
) -> tuple[Any, PassTime]:
    """Run ``run()`` (one pass, returning its wall seconds first) and time its parts."""
    before = _cache_seconds(client) if cache else {}
    with get_task_stream(client) as stream:
        result = run()
    after = _cache_seconds(client) if cache else {}
    busy = sum(
        part["stop"] - part["start"]
        for task in stream.data
        for part in task["startstops"]
        if part["action"] == "compute"
    )
    threads = sum(client.nthreads().values())
    wall = result[0] if isinstance(result, tuple) else result
    spent = {k: after[k] - before[k] for k in after}
    return result, PassTime(label, wall, threads, chunks, busy, spent)


_CACHE_COLUMNS = {f"cache: {n}" for n in (*CACHE_PARTS.values(), "the rest")}


def markdown(times: list[PassTime]) -> str:
    """The breakdown as a markdown table, one row per pass, in ms per chunk."""
    columns = list(times[0].per_chunk_ms())
    rows = []
    for t in times:
        parts = t.per_chunk_ms()
        cached = bool(t.cache)
        rows.append(
            [t.label, f"{t.wall:.2f}"]
            + [f"{parts[c]:.2f}" if cached or c not in _CACHE_COLUMNS else "-" for c in columns]
        )
    return _report.table(["pass", "wall s", *(f"{c} ms" for c in columns)], rows)
