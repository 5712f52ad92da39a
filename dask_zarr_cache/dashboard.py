"""The cache on the Dask dashboard and in Prometheus.

- :class:`CacheHistory` samples the per-worker counters that arrive with heartbeats
  (``ws.metrics["zarr_cache_*"]``) into a short time series on the scheduler.
- :func:`zarr_cache_doc` is the Bokeh page served at ``/individual-zarr-cache``.
- :class:`StatsHandler` serves the latest sample as JSON at ``/zarr-cache/stats.json``.
- :class:`PrometheusCollector` exports ``dask_zarr_cache_*`` metrics on ``/metrics`` of the
  scheduler (per worker and cluster totals) and of every worker.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import dask.config

from dask_zarr_cache._names import EXTENSION_NAME, METRIC_PREFIX
from dask_zarr_cache._stats import CacheCounters, total_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from distributed import Scheduler

__all__ = [
    "PAGE_ROUTE",
    "CacheHistory",
    "PrometheusCollector",
    "StatsHandler",
    "cost_saving",
    "zarr_cache_doc",
]

#: Where the page is served; ``individual-`` puts it in the "More..." menu when it is
#: registered before the dashboard starts (preload).
PAGE_ROUTE = "/individual-zarr-cache"
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
    """Samples of the cluster's cache counters, one per second, kept for a while."""

    def __init__(self, scheduler: Scheduler) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        maxlen = int(dask.config.get("zarr-cache.history-seconds"))
        self.samples: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._callback = PeriodicCallback(self.sample, 1000)

    def start(self) -> None:
        """Start sampling every second."""
        self.sample()
        self._callback.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._callback.stop()

    def sample(self) -> dict[str, Any]:
        """Take one sample now and return it."""
        workers = worker_counters(self.scheduler)
        total = total_of(workers)
        sample = {"time": time.time(), "total": total, "workers": workers}
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


def _history(scheduler: Scheduler) -> CacheHistory | None:
    state = scheduler.extensions.get(EXTENSION_NAME)
    return None if state is None else state.history


# -- JSON -------------------------------------------------------------------------------
def _json_handler_class() -> type:
    from tornado.web import RequestHandler

    class _StatsHandler(RequestHandler):
        def initialize(self, server: Scheduler) -> None:
            self.server = server

        def get(self) -> None:
            history = _history(self.server)
            self.set_header("Content-Type", "application/json")
            if history is None:
                self.set_status(404)
                self.write(json.dumps({"error": "ZarrCachePlugin is not registered"}))
                return
            self.write(json.dumps(history.latest()))

    return _StatsHandler


StatsHandler = _json_handler_class()


def add_http_routes(scheduler: Scheduler) -> None:
    """Serve ``/zarr-cache/stats.json`` and the page on a running scheduler (idempotent).

    A page added at runtime is served at :data:`PAGE_ROUTE` but not listed in the
    "More..." menu, which distributed builds from its own dashboard application only;
    :func:`register_dashboard_page` (the preload) lists it there.
    """
    from tornado import web
    from tornado.ioloop import IOLoop

    http = getattr(scheduler, "http_application", None)
    if http is None or getattr(scheduler, "_zarr_cache_routes", False):
        return
    scheduler._zarr_cache_routes = True
    prefix = _dashboard_prefix(scheduler)
    http.add_application(
        web.Application(
            [(rf"{prefix}/zarr-cache/stats\.json", StatsHandler, {"server": scheduler})]
        )
    )
    if _page_already_served(scheduler):
        return
    try:
        from distributed.dashboard.core import BokehApplication
    except ImportError:  # no bokeh: JSON and Prometheus only
        return
    page = BokehApplication({PAGE_ROUTE: zarr_cache_doc}, scheduler, prefix=prefix)
    http.add_application(page)
    page.initialize(IOLoop.current())


def _dashboard_prefix(scheduler: Scheduler) -> str:
    for app in scheduler.http_application.applications:
        prefix = getattr(app, "_prefix", None)
        if isinstance(prefix, str) and hasattr(app, "app_paths"):
            return prefix.rstrip("/")
    return ""


def _page_already_served(scheduler: Scheduler) -> bool:
    return any(
        PAGE_ROUTE in getattr(app, "app_paths", ())
        for app in scheduler.http_application.applications
    )


def register_dashboard_page() -> None:
    """Add the page to distributed's dashboard applications (before the scheduler starts).

    Pages registered this way are listed in the dashboard's "More..." menu.
    """
    try:
        from distributed.dashboard.scheduler import applications
    except ImportError:
        return
    applications.setdefault(PAGE_ROUTE, zarr_cache_doc)


# -- the Bokeh page ---------------------------------------------------------------------
def zarr_cache_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Any) -> None:
    """Build the "Zarr Cache" dashboard page for one browser session."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, Div, NumeralTickFormatter
    from bokeh.plotting import figure

    history_source = ColumnDataSource(
        {k: [] for k in ("time", "ratio", "local", "peer", "remote", "evictions", "expired")}
    )
    fill_source = ColumnDataSource({"worker": [], "bytes": [], "capacity": []})
    summary = Div(text="", sizing_mode="stretch_width")

    ratio = figure(
        title="Cluster hit ratio (reads not sent to the source, per second)",
        x_axis_type="datetime",
        height=220,
        sizing_mode="stretch_width",
        y_range=(0, 1.05),
    )
    ratio.line("time", "ratio", source=history_source, line_width=2)
    ratio.yaxis.formatter = NumeralTickFormatter(format="0%")

    origin = figure(
        title="Bytes served by origin (per second)",
        x_axis_type="datetime",
        height=240,
        sizing_mode="stretch_width",
    )
    for name, color, label in (
        ("local", "#2ca02c", "local disk"),
        ("peer", "#1f77b4", "peer"),
        ("remote", "#d62728", "remote source"),
    ):
        origin.line(
            "time", name, source=history_source, color=color, line_width=2, legend_label=label
        )
    origin.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
    origin.legend.location = "top_left"

    churn = figure(
        title="Evictions and expirations (cumulative)",
        x_axis_type="datetime",
        height=200,
        sizing_mode="stretch_width",
    )
    churn.line(
        "time",
        "evictions",
        source=history_source,
        color="#9467bd",
        line_width=2,
        legend_label="evictions",
    )
    churn.line(
        "time",
        "expired",
        source=history_source,
        color="#8c564b",
        line_width=2,
        legend_label="expired",
    )
    churn.legend.location = "top_left"

    fill = figure(
        title="Cache fill per worker vs max_size",
        y_range=[],
        height=260,
        sizing_mode="stretch_width",
    )
    for field_name, color, label in (
        ("capacity", "#dddddd", "max_size"),
        ("bytes", "#1f77b4", "cached bytes"),
    ):
        fill.hbar(
            y="worker",
            right=field_name,
            height=0.8,
            source=fill_source,
            color=color,
            legend_label=label,
        )
    fill.xaxis.formatter = NumeralTickFormatter(format="0.0 b")

    def update() -> None:
        history = _history(scheduler)
        if history is None or not history.samples:
            summary.text = "<b>ZarrCachePlugin is not registered on this cluster.</b>"
            return
        samples = list(history.samples)
        data: dict[str, list[float]] = {k: [] for k in history_source.data}
        for prev, cur in itertools.pairwise(samples):
            dt = max(cur["time"] - prev["time"], 1e-3)
            d = {k: cur["total"][k] - prev["total"][k] for k in cur["total"]}
            data["time"].append(cur["time"] * 1000)
            data["ratio"].append(hit_ratio(d, no_reads=float("nan")))  # a gap, not 0%
            data["local"].append(d["hit_bytes"] / dt)
            data["peer"].append(d["peer_bytes"] / dt)
            data["remote"].append(d["remote_bytes"] / dt)
            data["evictions"].append(cur["total"]["evictions"])
            data["expired"].append(cur["total"]["expired"])
        history_source.data = data
        latest = history.latest()
        workers = sorted(latest["workers"])
        fill.y_range.factors = workers
        fill_source.data = {
            "worker": workers,
            "bytes": [latest["workers"][w]["bytes"] for w in workers],
            "capacity": [latest["workers"][w]["capacity"] for w in workers],
        }
        total = latest["total"]
        summary.text = (
            f"<h3>Zarr Cache</h3><p>hit ratio <b>{latest['hit_ratio']:.1%}</b> &middot; "
            f"remote GETs <b>{total['remote_reads']:,}</b> &middot; "
            f"S3 GETs avoided <b>{latest['gets_avoided']:,}</b> "
            f"({latest['bytes_avoided'] / 2**20:,.1f} MiB) &middot; estimated saving "
            f"<b>${latest['usd_saved']:,.4f}</b> &middot; entries {total['entries']:,} "
            f"&middot; evictions {total['evictions']:,} &middot; expired {total['expired']:,}"
            "</p>"
        )

    update()
    doc.title = "Dask: Zarr Cache"
    doc.add_root(
        column(
            summary,
            row(ratio, churn, sizing_mode="stretch_width"),
            row(origin, fill, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
    )
    doc.add_periodic_callback(update, 1000)


# -- Prometheus -------------------------------------------------------------------------
class PrometheusCollector:
    """``dask_zarr_cache_*`` metrics of every scheduler and worker in this process.

    Registered once per process into ``prometheus_client.REGISTRY``, which distributed
    serves on ``/metrics`` of the scheduler and of each worker.
    """

    def collect(self) -> Iterator[Any]:
        """Yield metric families (called by prometheus_client on each scrape)."""
        from distributed import Scheduler, Worker
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        per_worker: dict[str, dict[str, int]] = {}
        for worker in list(Worker._instances):
            cache = worker.extensions.get(EXTENSION_NAME)
            if cache is not None:
                per_worker[worker.address] = cache.counters.as_dict()
        totals = {}  # by scheduler address: a process may host several (tests, notebooks)
        for scheduler in list(Scheduler._instances):
            if scheduler.status.name == "running" and _history(scheduler) is not None:
                counters = worker_counters(scheduler)
                per_worker.update(counters)
                totals[scheduler.address] = total_of(counters)

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
            for name in (
                "gets_avoided",
                "bytes_avoided",
                "hits",
                "misses",
                "remote_reads",
                "remote_bytes",
                "peer_reads",
            )
        }
        for address, total in totals.items():
            ratio.add_metric([address], hit_ratio(total))
            values = {**total, **cost_saving(total)}
            for name, family in cluster.items():
                family.add_metric([address], values[name])
        yield ratio
        yield from cluster.values()


_collector_registered = False


def register_prometheus_collector() -> None:
    """Register :class:`PrometheusCollector` once per process (no-op without the package)."""
    global _collector_registered
    if _collector_registered:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    REGISTRY.register(PrometheusCollector())
    _collector_registered = True
