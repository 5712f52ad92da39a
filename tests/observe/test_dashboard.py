"""Observability on a real cluster: the dashboard page, JSON, Prometheus, fine metrics.

The browser test drives Debian's Chromium through chromedriver (skipped with the reason
when they are not installed; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest

from dask_zarr_cache import cached as cached_status
from dask_zarr_cache import cluster_stats
from dask_zarr_cache.observe.history import cost_saving
from tests.conftest import cache_cluster, cached, read_all, write_array
from tests.test_worker_faults import wait_for


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def prometheus_samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("dask_zarr_cache"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def busy_cluster(s3):
    """A cluster that read a dataset three times through a cache a bit too small for it."""
    path = "test/dashboard.zarr"
    data = np.random.default_rng(30).random((256, 128))
    write_array(s3, path, data, chunks=(16, 32), compressors=None)  # 64 chunks of 4 KiB
    with cache_cluster(max_size=80 * 1024) as (cluster, client):
        store = cached(s3, path)
        for _ in range(3):
            np.testing.assert_array_equal(read_all(store, client), data)
            time.sleep(1)
        # Every worker reads the same rows: all but their owner must fetch from a peer.
        for worker in sorted(client.scheduler_info()["workers"]):
            client.submit(_read_rows, store, 0, 16, workers=[worker], pure=False).result()
        yield cluster, client


def _read_rows(store, start, stop):
    import zarr

    return float(zarr.open_array(store, mode="r")[start:stop].sum())


def dashboard_base(client) -> str:
    return client.dashboard_link.rsplit("/", 1)[0]


def test_page_json_and_prometheus_agree_with_cluster_stats(busy_cluster):
    _, client = busy_cluster
    base = dashboard_base(client)
    assert base.startswith("http://127.0.0.1:")
    stats = cluster_stats(client)
    # Heartbeats carry the counters to the scheduler; wait until they caught up.
    wait_for(lambda: json.loads(fetch(base + "/zarr-cache/stats.json"))["total"] == stats["total"])
    page_data = json.loads(fetch(base + "/zarr-cache/stats.json"))
    assert page_data["workers"] == stats["workers"]
    assert page_data["total"]["evictions"] > 0 and page_data["total"]["remote_reads"] > 0
    assert page_data["gets_avoided"] == stats["total"]["hits"] + stats["total"]["peer_reads"]
    assert page_data["usd_saved"] == pytest.approx(cost_saving(stats["total"])["usd_saved"])

    html = fetch(base + "/individual-zarr-cache")
    assert "<title>Dask: Zarr Cache</title>" in html

    metrics = prometheus_samples(fetch(base + "/metrics"))
    for addr, counters in stats["workers"].items():
        assert metrics[f'dask_zarr_cache_hits_total{{worker="{addr}"}}'] == counters["hits"]
        assert metrics[f'dask_zarr_cache_bytes{{worker="{addr}"}}'] == counters["bytes"]
    total, label = stats["total"], f'{{scheduler="{client.scheduler.address}"}}'
    assert metrics[f"dask_zarr_cache_cluster_remote_reads_total{label}"] == total["remote_reads"]
    assert metrics[f"dask_zarr_cache_cluster_gets_avoided_total{label}"] == (
        total["hits"] + total["peer_reads"]
    )


def test_each_worker_exports_its_own_metrics(busy_cluster):
    _, client = busy_cluster
    stats = cluster_stats(client)["workers"]
    for addr, info in client.scheduler_info()["workers"].items():
        port = info["services"]["dashboard"]
        metrics = prometheus_samples(fetch(f"http://127.0.0.1:{port}/metrics"))
        assert (
            metrics[f'dask_zarr_cache_evictions_total{{worker="{addr}"}}']
            == stats[addr]["evictions"]
        )
        # And the scalar columns of the dashboard's Workers table.
        assert info["metrics"]["zarr_cache_entries"] == stats[addr]["entries"]


def _fine_metric_labels(dask_scheduler) -> list[str]:
    return sorted(
        {
            str(part)
            for key in dask_scheduler.cumulative_worker_metrics
            if isinstance(key, tuple)
            for part in key
            if "zarr-cache" in str(part)
        }
    )


def test_fine_performance_metrics_show_where_time_went(busy_cluster):
    _, client = busy_cluster
    wait_for(lambda: "zarr-cache-peer-fetch" in client.run_on_scheduler(_fine_metric_labels))
    labels = client.run_on_scheduler(_fine_metric_labels)
    assert {"zarr-cache-local-read", "zarr-cache-peer-fetch", "zarr-cache-source-fetch"} <= set(
        labels
    )


def _chrome():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian chromium + chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _plotted_points(browser) -> int:
    return browser.execute_script(
        """
        const doc = window.Bokeh && Bokeh.documents[0];
        if (!doc) { return 0; }
        let n = 0;
        for (const model of doc._all_models.values()) {
            if (model.type === "ColumnDataSource") {
                const data = model.data;
                const column = data instanceof Map
                    ? (data.get("time") || data.get("worker"))
                    : (data.time || data.worker);
                if (column) { n += column.length; }
            }
        }
        return n;
        """
    )


def test_real_browser_renders_the_page_with_data(busy_cluster, tmp_path):
    from PIL import Image

    _, client = busy_cluster
    browser = _chrome()
    try:
        browser.get(dashboard_base(client) + "/individual-zarr-cache")
        wait_for(lambda: _plotted_points(browser) > 3, timeout=30, interval=0.5)
        time.sleep(1.5)  # let the canvases paint
        shot = tmp_path / "zarr-cache-dashboard.png"
        browser.save_screenshot(str(shot))
        summary = browser.find_element("tag name", "body").text
    finally:
        browser.quit()
    assert "hit ratio" in summary and "S3 GETs avoided" in summary
    # The lines and bars are drawn: count pixels of the plot colours.
    image = Image.open(shot).convert("RGB")
    counts = {rgb: n for n, rgb in image.getcolors(maxcolors=image.width * image.height)}
    colours = {rgb: counts.get(rgb, 0) for rgb in [(31, 119, 180), (44, 160, 44), (214, 39, 40)]}
    assert all(n > 50 for n in colours.values()), colours
    if target := os.environ.get("DASK_ZARR_CACHE_SCREENSHOT"):
        shutil.copy(shot, target)


def test_the_datasets_table_shows_what_cached_reports(busy_cluster, s3):
    _, client = busy_cluster
    base = dashboard_base(client)
    store = cached(s3, "test/dashboard.zarr")

    def served():
        return json.loads(fetch(base + "/zarr-cache/datasets.json"))

    # Listed by a worker, looked up in the index; the first request starts it.
    wait_for(lambda: served(), timeout=30, interval=0.5)
    expected = cached_status(client, store).as_dict()
    wait_for(lambda: served() == {str(store): expected}, timeout=30, interval=0.5)
    total = expected[""]
    # The caches are a bit too small for the dataset: part of it is on the disks.
    on_disk = set().union(*client.run(_chunk_files).values())
    assert total["objects"] == 64 and total["cached_objects"] == len(on_disk) < 64

    browser = _chrome()
    try:
        browser.get(base + "/individual-zarr-cache")
        wait_for(
            lambda: "objects cached" in browser.find_element("tag name", "body").text,
            timeout=30,
            interval=0.5,
        )
        table = browser.find_element("tag name", "body").text  # Bokeh's Divs: shadow DOM
    finally:
        browser.quit()
    assert str(store) in table
    assert f"{total['cached_objects']} / 64" in table and f"{total['fraction']:.1%}" in table


def _chunk_files(dask_worker) -> set[str]:
    files = dask_worker.extensions["zarr_cache"].disk.scan()
    return {f.key for f in files if not f.key.endswith("zarr.json")}
