"""The cache on the Dask dashboard: the "Zarr Cache" page and a JSON route.

- :func:`zarr_cache_doc` is the Bokeh page served at ``/individual-zarr-cache``.
- :class:`StatsHandler` serves the latest sample as JSON at ``/zarr-cache/stats.json``.
- :class:`DatasetsHandler` serves each dataset's status (what ``cached()`` reports) as
  JSON at ``/zarr-cache/datasets.json``.

They read the scheduler's :class:`~dask_zarr_cache.observe.history.CacheHistory` and
:class:`~dask_zarr_cache.observe.coverage.DatasetCoverage`.
"""

from __future__ import annotations

import html
import itertools
import json
import weakref
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.core.names import WARM_METADATA
from dask_zarr_cache.observe.coverage import coverage_of
from dask_zarr_cache.observe.history import history_of, hit_ratio

if TYPE_CHECKING:
    from collections.abc import Callable

    from distributed import Scheduler

__all__ = [
    "PAGE_ROUTE",
    "DatasetsHandler",
    "StatsHandler",
    "add_http_routes",
    "register_dashboard_page",
    "zarr_cache_doc",
]

#: Where the page is served; ``individual-`` puts it in the "More..." menu when it is
#: registered before the dashboard starts (preload).
PAGE_ROUTE = "/individual-zarr-cache"


# -- JSON -------------------------------------------------------------------------------
def _json_handler_class(read: Callable[[Scheduler], Any | None]) -> type:
    """A route answering ``read(scheduler)`` as JSON (404 without the plugin: ``None``)."""
    from tornado.web import RequestHandler

    class _JSONHandler(RequestHandler):
        def initialize(self, server: Scheduler) -> None:
            self.server = server

        def get(self) -> None:
            found = read(self.server)
            self.set_header("Content-Type", "application/json")
            if found is None:
                self.set_status(404)
                self.write(json.dumps({"error": "ZarrCachePlugin is not registered"}))
                return
            self.write(json.dumps(found))

    return _JSONHandler


def _latest_sample(scheduler: Scheduler) -> dict[str, Any] | None:
    history = history_of(scheduler)
    return None if history is None else history.latest()


def _dataset_statuses(scheduler: Scheduler) -> dict[str, Any] | None:
    coverage = coverage_of(scheduler)
    return None if coverage is None else coverage.latest()


StatsHandler = _json_handler_class(_latest_sample)
DatasetsHandler = _json_handler_class(_dataset_statuses)


#: Schedulers whose HTTP server has the routes already.
_routed: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def add_http_routes(scheduler: Scheduler) -> None:
    """Serve ``/zarr-cache/stats.json`` and the page on a running scheduler (idempotent).

    A page added at runtime is served at :data:`PAGE_ROUTE` but not listed in the
    "More..." menu, which distributed builds from its own dashboard application only;
    :func:`register_dashboard_page` (the preload) lists it there.
    """
    from tornado import web
    from tornado.ioloop import IOLoop

    http = getattr(scheduler, "http_application", None)
    if http is None or scheduler in _routed:
        return
    _routed.add(scheduler)
    prefix = _dashboard_prefix(scheduler)
    http.add_application(
        web.Application(
            [
                (rf"{prefix}/zarr-cache/stats\.json", StatsHandler, {"server": scheduler}),
                (rf"{prefix}/zarr-cache/datasets\.json", DatasetsHandler, {"server": scheduler}),
            ]
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


def _warm_line(scheduler: Scheduler) -> str:
    """A line about the running (or last) ``warm()``, from the metadata it publishes."""
    state = scheduler.get_metadata(keys=list(WARM_METADATA), default=None)
    if not isinstance(state, dict):
        return ""
    verb = "warmed" if state.get("finished") else "warming"
    return (
        f"<p id='zarr-cache-warm'>{verb}: <b>{state['done']:,} / {state['total']:,}</b> "
        f"objects ({state['bytes_done'] / 2**20:,.1f} / {state['bytes_total'] / 2**20:,.1f} "
        "MiB)</p>"
    )


def _datasets_table(scheduler: Scheduler) -> str:
    """A table of each dataset read (or warmed) on the cluster: how much of it is cached."""
    statuses = _dataset_statuses(scheduler)
    if not statuses:
        return ""
    rows = []
    for name, variables in statuses.items():
        total = variables[""]  # the dataset's line first, then each array's (a group)
        parts = [(html.escape(name), "all", total, " style='font-weight:bold'")]
        parts += [("", html.escape(path), v, "") for path, v in variables.items() if path]
        for dataset, label, v, style in parts:
            rows.append(
                f"<tr{style}><td>{dataset}</td><td>{label}</td>"
                f"<td>{v['cached_objects']:,} / {v['objects']:,}</td>"
                f"<td>{v['cached_bytes'] / 2**20:,.1f} / {v['bytes'] / 2**20:,.1f}</td>"
                f"<td>{v['fraction']:.1%}</td></tr>"
            )
    return (
        "<table id='zarr-cache-datasets' style='border-collapse:collapse' cellpadding='3'>"
        "<tr><th>dataset</th><th>variable</th><th>objects cached</th><th>MiB cached</th>"
        f"<th>cached</th></tr>{''.join(rows)}</table>"
    )


# -- the Bokeh page ---------------------------------------------------------------------
def zarr_cache_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Any) -> None:
    """Build the "Zarr Cache" dashboard page for one browser session."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, Div, NumeralTickFormatter
    from bokeh.plotting import figure

    history_source = ColumnDataSource(
        {k: [] for k in ("time", "memory", "local", "peer", "remote", "evictions", "expired")}
    )
    # Only seconds with reads: an idle second is neither a gap nor a 0% hit ratio.
    ratio_source = ColumnDataSource({"time": [], "ratio": []})
    fill_source = ColumnDataSource({"worker": [], "bytes": [], "capacity": []})
    summary = Div(text="", sizing_mode="stretch_width")
    datasets = Div(text="", sizing_mode="stretch_width")

    ratio = figure(
        title="Cluster hit ratio (reads not sent to the source, per second)",
        x_axis_type="datetime",
        height=220,
        sizing_mode="stretch_width",
        y_range=(0, 1.05),
    )
    ratio.line("time", "ratio", source=ratio_source, line_width=2)
    ratio.yaxis.formatter = NumeralTickFormatter(format="0%")

    origin = figure(
        title="Bytes served by origin (per second)",
        x_axis_type="datetime",
        height=240,
        sizing_mode="stretch_width",
    )
    for name, color, label in (
        ("memory", "#9467bd", "local memory"),
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
    fill.legend.orientation = "horizontal"
    fill.add_layout(fill.legend[0], "above")  # beside the title, never over the bars

    def update() -> None:
        history = history_of(scheduler)
        if history is None or not history.samples:
            summary.text = "<b>ZarrCachePlugin is not registered on this cluster.</b>"
            return
        samples = list(history.samples)
        data: dict[str, list[float]] = {k: [] for k in history_source.data}
        ratios: dict[str, list[float]] = {"time": [], "ratio": []}
        for prev, cur in itertools.pairwise(samples):
            dt = max(cur["time"] - prev["time"], 1e-3)
            d = {k: cur["total"][k] - prev["total"][k] for k in cur["total"]}
            data["time"].append(cur["time"] * 1000)
            if d["hits"] + d["peer_reads"] + d["remote_reads"]:
                ratios["time"].append(cur["time"] * 1000)
                ratios["ratio"].append(hit_ratio(d))
            data["memory"].append(d["memory_hit_bytes"] / dt)
            data["local"].append((d["hit_bytes"] - d["memory_hit_bytes"]) / dt)
            data["peer"].append(d["peer_bytes"] / dt)
            data["remote"].append(d["remote_bytes"] / dt)
            data["evictions"].append(cur["total"]["evictions"])
            data["expired"].append(cur["total"]["expired"])
        history_source.data = data
        ratio_source.data = ratios
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
            f"</p>{_warm_line(scheduler)}"
        )
        datasets.text = _datasets_table(scheduler)

    update()
    doc.title = "Dask: Zarr Cache"
    doc.add_root(
        column(
            summary,
            row(ratio, churn, sizing_mode="stretch_width"),
            row(origin, fill, sizing_mode="stretch_width"),
            datasets,
            sizing_mode="stretch_width",
        )
    )
    doc.add_periodic_callback(update, 1000)
