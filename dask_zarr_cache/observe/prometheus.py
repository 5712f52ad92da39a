"""``dask_zarr_cache_*`` Prometheus metrics of the servers the cache is installed on.

distributed serves ``prometheus_client.REGISTRY`` on ``/metrics`` of the scheduler and of
each worker.  One collector per process is registered there; it reports the servers bound
to it with :func:`bind_prometheus` (a scheduler with the cache: per-worker counters from
heartbeats and cluster totals; a worker with the cache: its own counters) and forgets a
server when it is garbage collected or closed.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.names import EXTENSION_NAME
from dask_zarr_cache.observe.history import (
    COUNTER_NAMES,
    GAUGES,
    cost_saving,
    history_of,
    hit_ratio,
    worker_counters,
)
from dask_zarr_cache.worker.counters import total_of

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["PrometheusCollector", "bind_prometheus"]

_CLUSTER_TOTALS = (
    "gets_avoided",
    "bytes_avoided",
    "hits",
    "misses",
    "remote_reads",
    "remote_bytes",
    "peer_reads",
)


class PrometheusCollector:
    """Metrics of the schedulers and workers bound to it (see module docstring)."""

    def __init__(self) -> None:
        self.servers: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        """Yield metric families (called by prometheus_client on each scrape)."""
        from distributed import Scheduler
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        per_worker: dict[str, dict[str, int]] = {}
        totals = {}  # by scheduler address: a process may host several (tests, notebooks)
        for server in list(self.servers):
            if server.status.name not in ("running", "paused"):
                continue
            if isinstance(server, Scheduler):
                if history_of(server) is None:
                    continue
                workers = worker_counters(server)
                per_worker.update(workers)
                totals[server.address] = total_of(workers)
            else:
                cache = server.extensions.get(EXTENSION_NAME)
                if cache is not None:
                    per_worker[server.address] = cache.counters.as_dict()

        for name in COUNTER_NAMES:
            gauge = name in GAUGES
            metric = f"dask_zarr_cache_{name}" + ("_bytes" if name == "capacity" else "")
            family = (GaugeMetricFamily if gauge else CounterMetricFamily)(
                metric, f"zarr cache {name.replace('_', ' ')} per worker", labels=["worker"]
            )
            for addr, counters in per_worker.items():
                family.add_metric([addr], counters.get(name, 0))
            yield family
        if not totals:
            return
        ratio = GaugeMetricFamily(
            "dask_zarr_cache_cluster_hit_ratio",
            "share of cluster reads not sent to the source",
            labels=["scheduler"],
        )
        cluster = {
            name: CounterMetricFamily(
                f"dask_zarr_cache_cluster_{name}",
                f"zarr cache {name.replace('_', ' ')}, cluster total",
                labels=["scheduler"],
            )
            for name in _CLUSTER_TOTALS
        }
        for address, total in totals.items():
            ratio.add_metric([address], hit_ratio(total))
            values = {**total, **cost_saving(total)}
            for name, family in cluster.items():
                family.add_metric([address], values[name])
        yield ratio
        yield from cluster.values()


_collector: PrometheusCollector | None = None


def bind_prometheus(server: Any) -> None:
    """Report ``server``'s cache metrics on ``/metrics`` (no-op without prometheus_client)."""
    global _collector
    if _collector is None:
        try:
            from prometheus_client import REGISTRY
        except ImportError:
            return
        _collector = PrometheusCollector()
        REGISTRY.register(_collector)
    _collector.servers.add(server)
