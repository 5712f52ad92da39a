"""The scheduler's short history of the cache counters, and figures derived from them.

Workers publish their counters as ``worker.metrics["zarr_cache_*"]``; they arrive with
every heartbeat.  :class:`CacheHistory` samples them once a second, for the dashboard page,
the JSON route and Prometheus.
"""

from __future__ import annotations

from collections import deque
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import dask.config

from dask_zarr_cache.core.clock import Clock, wall_clock
from dask_zarr_cache.core.names import EXTENSION_NAME, METRIC_PREFIX
from dask_zarr_cache.worker.counters import CacheCounters, total_of

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = [
    "COUNTER_NAMES",
    "GAUGES",
    "CacheHistory",
    "cost_saving",
    "history_of",
    "hit_ratio",
    "worker_counters",
]

COUNTER_NAMES = [f.name for f in fields(CacheCounters)]
GAUGES = {"entries", "bytes", "capacity", "caching_disabled"}

dask.config.update_defaults(
    {
        "zarr-cache": {
            # Public S3 list prices (us-east-1, standard tier): GET requests and egress.
            "cost": {"usd-per-1000-gets": 0.0004, "usd-per-gb-egress": 0.09},
            "history-seconds": 600,
        }
    }
)


def worker_counters(scheduler: Scheduler) -> dict[str, dict[str, int]]:
    """Latest heartbeat counters of every worker that has a cache."""
    out = {}
    for addr, ws in scheduler.workers.items():
        counters = {
            name: int(ws.metrics[METRIC_PREFIX + name])
            for name in COUNTER_NAMES
            if METRIC_PREFIX + name in ws.metrics
        }
        if counters:
            out[addr] = counters
    return out


def cost_saving(total: dict[str, int]) -> dict[str, float]:
    """GETs and bytes the cache kept away from the source, and their estimated price."""
    gets = total.get("hits", 0) + total.get("peer_reads", 0)
    nbytes = total.get("hit_bytes", 0) + total.get("peer_bytes", 0)
    per_get = float(dask.config.get("zarr-cache.cost.usd-per-1000-gets")) / 1000
    per_byte = float(dask.config.get("zarr-cache.cost.usd-per-gb-egress")) / 1e9
    return {
        "gets_avoided": gets,
        "bytes_avoided": nbytes,
        "usd_saved": gets * per_get + nbytes * per_byte,
    }


def hit_ratio(total: dict[str, int], no_reads: float = 0.0) -> float:
    """Share of reads that did not go to the source (``no_reads`` if there were none)."""
    served = total.get("hits", 0) + total.get("peer_reads", 0)
    reads = served + total.get("remote_reads", 0)
    return served / reads if reads else no_reads


class CacheHistory:
    """Samples of the cluster's cache counters, one per second, kept for a while.

    Parameters
    ----------
    scheduler : Scheduler
        Whose workers' metrics are sampled.
    clock : callable
        Seconds since the epoch: each sample's time.

    """

    def __init__(self, scheduler: Scheduler, clock: Clock = wall_clock) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self.clock = clock
        maxlen = int(dask.config.get("zarr-cache.history-seconds"))
        self.samples: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._callback = PeriodicCallback(self._tick, 1000)

    def start(self) -> None:
        """Start sampling every second."""
        self.sample()
        self._callback.start()

    def _tick(self) -> None:
        self.sample()

    def stop(self) -> None:
        """Stop sampling."""
        self._callback.stop()

    def sample(self) -> dict[str, Any]:
        """Take one sample now and return it."""
        workers = worker_counters(self.scheduler)
        total = total_of(workers)
        sample = {"time": self.clock(), "total": total, "workers": workers}
        self.samples.append(sample)
        return sample

    def latest(self) -> dict[str, Any]:
        """The latest sample with ratio and saving figures, as served to the page."""
        sample = self.samples[-1] if self.samples else self.sample()
        return {
            **sample,
            "hit_ratio": hit_ratio(sample["total"]),
            **cost_saving(sample["total"]),
        }


def history_of(scheduler: Scheduler) -> CacheHistory | None:
    """The counters history of ``scheduler``'s cache, if the plugin is registered."""
    state = scheduler.extensions.get(EXTENSION_NAME)
    return None if state is None else state.history
