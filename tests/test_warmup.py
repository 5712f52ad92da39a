"""Warming a dataset cluster-wide (``warm`` and ``dask-zarr-cache warm``) on real parts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster

from dask_zarr_cache import ClusterCacheStore, ZarrCacheError, cluster_stats, warm
from dask_zarr_cache.cli import EXIT_BAD_URL, EXIT_NO_PLUGIN, EXIT_NO_SCHEDULER
from tests.conftest import cache_cluster, chunk_gets, read_all, s3_store, write_array
from tests.test_worker_faults import wait_for


def write_dataset(s3, path):
    rng = np.random.default_rng(7)
    ds = xr.Dataset(
        {
            "temp": (("time", "x"), rng.random((48, 64))),
            "wind": (("time", "x"), rng.random((48, 64))),
        },
        coords={"time": np.arange(48), "x": np.arange(64)},
    )
    ds.chunk({"time": 8, "x": 32}).to_zarr(s3_store(s3, path), mode="w", consolidated=False)
    return ds


def _warm_line(dask_scheduler):
    from dask_zarr_cache.observe.dashboard import _warm_line

    return _warm_line(dask_scheduler)


def from_url(s3, path) -> ClusterCacheStore:
    return ClusterCacheStore.from_url(f"s3://{path}", storage_options=s3.storage_options)


def test_after_warm_a_full_read_makes_no_gets(s3, s3_path, client):
    ds = write_dataset(s3, s3_path)
    store = from_url(s3, s3_path)
    s3.reset_counts()
    report = warm(client, store, progress=False)
    gets = chunk_gets(s3, s3_path)
    data_objects = {k: n for k, n in gets.items() if k.split("/")[2] in ("temp", "wind")}
    assert len(data_objects) == 2 * 6 * 2
    assert report.chunks == len(gets) == 24 + 2  # and the coordinates "time" and "x"
    assert set(gets.values()) == {1}  # every object fetched exactly once
    assert report.skipped == 0 and report.gets == len(gets)
    s3.reset_counts()
    before = cluster_stats(client)["total"]
    opened = xr.open_zarr(store, consolidated=False)
    np.testing.assert_allclose(client.compute(opened.temp.sum()).result(), ds.temp.sum())
    np.testing.assert_allclose(client.compute(opened.wind.sum()).result(), ds.wind.sum())
    # Warmed at their homes: the reads, steered there, find them on their own disk.
    after = cluster_stats(client)["total"]
    hits, peers = (after[k] - before[k] for k in ("hits", "peer_reads"))
    assert hits + peers == 24 and hits >= 0.9 * 24, (hits, peers)
    # Every read in the cluster came from its disks; only xarray's index coordinates,
    # loaded by open_zarr in this (client) process, went to the source.
    assert sorted(chunk_gets(s3, s3_path)) == [f"{s3_path}/time/c/0", f"{s3_path}/x/c/0"]
    line = client.run_on_scheduler(_warm_line)
    assert "warmed: <b>26 / 26</b>" in line  # what the dashboard page shows
    s3.reset_counts()
    again = warm(client, store, progress=False)
    assert again.chunks == 0 and again.skipped == report.chunks and again.gets == 0
    assert chunk_gets(s3, s3_path) == {}


def test_warm_only_some_variables_and_a_time_range(s3, s3_path, client):
    write_dataset(s3, s3_path)
    s3.reset_counts()
    report = warm(
        client,
        from_url(s3, s3_path),
        variables=["temp"],
        selection={"time": slice(8, 24)},
        progress=False,
    )
    fetched = sorted(chunk_gets(s3, s3_path))
    assert report.chunks == 2 * 2  # time chunks 1 and 2, both x chunks
    assert fetched == [f"{s3_path}/temp/c/{t}/{x}" for t in (1, 2) for x in (0, 1)]
    with pytest.raises(ZarrCacheError, match="no such variables"):
        warm(client, from_url(s3, s3_path), variables=["pressure"], progress=False)


def test_a_selection_bigger_than_the_budget_is_refused_or_trimmed(s3, s3_path):
    data = np.random.default_rng(3).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)  # 16 x 2 KiB
    with cache_cluster(n_workers=2, max_size=5 * 2048) as (_cluster, client):
        store = from_url(s3, s3_path)
        s3.reset_counts()
        with pytest.raises(ZarrCacheError, match="fit='trim'"):
            warm(client, store, progress=False)
        assert chunk_gets(s3, s3_path) == {}  # refused up front: nothing fetched
        report = warm(client, store, fit="trim", progress=False)
        assert report.chunks == 10 and report.left_out == 6
        stats = cluster_stats(client)
        assert all(w["bytes"] <= 5 * 2048 for w in stats["workers"].values())
        assert stats["total"]["entries"] == 10
        np.testing.assert_array_equal(read_all(store, client), data)


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dask_zarr_cache.cli", "warm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storage_options(s3) -> list[str]:
    return [f"--storage-option={k}={v}" for k, v in s3.storage_options.items()]


def test_cli_warms_and_reports(s3, s3_path, client):
    write_dataset(s3, s3_path)
    s3.reset_counts()
    done = run_cli(
        f"s3://{s3_path}",
        "--scheduler",
        client.scheduler.address,
        "--variable",
        "wind",
        *storage_options(s3),
    )
    assert done.returncode == 0, done.stderr
    assert "warmed 12 objects" in done.stdout
    assert len([k for k in chunk_gets(s3, s3_path) if "/wind/c/" in k]) == 12


def test_cli_says_what_is_wrong(s3, s3_path, client):
    write_dataset(s3, s3_path)
    bad_url = run_cli(f"s3://{s3_path}-nope", "--scheduler", client.scheduler.address,
                      *storage_options(s3))  # fmt: skip
    assert bad_url.returncode == EXIT_BAD_URL and "cannot read" in bad_url.stderr
    unreachable = run_cli(f"s3://{s3_path}", "--scheduler", "tcp://127.0.0.1:9",
                          "--timeout", "2s", *storage_options(s3))  # fmt: skip
    assert unreachable.returncode == EXIT_NO_SCHEDULER and "cannot reach" in unreachable.stderr
    with LocalCluster(
        n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        plain = run_cli(f"s3://{s3_path}", "--scheduler", cluster.scheduler_address,
                        *storage_options(s3))  # fmt: skip
    assert plain.returncode == EXIT_NO_PLUGIN and "not registered" in plain.stderr


# -- as a person sees it: a terminal and a browser -------------------------------------------
def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def tmux_session():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    name = f"dzc-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the last session's may linger
    _tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "20")
    try:
        yield name
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-t", session)


def _exited(screen: str) -> bool:
    return re.search(r"EXIT=\d+", screen) is not None  # the typed command shows "EXIT=$?"


def _warm_command(s3, s3_path, client) -> str:
    options = " ".join(f"'{o}'" for o in storage_options(s3))
    return (
        f"{sys.executable} -m dask_zarr_cache.cli warm s3://{s3_path} "
        f"--scheduler {client.scheduler.address} --concurrency 1 {options}; echo EXIT=$?"
    )


def test_the_cli_progress_bar_advances_in_a_terminal(s3, s3_path, client, tmux_session):
    write_dataset(s3, s3_path)
    s3.latency = 0.1  # 26 objects, one source read at a time per worker: a few seconds
    try:
        _tmux("send-keys", "-t", tmux_session, _warm_command(s3, s3_path, client), "Enter")
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _exited(_screen(tmux_session)):
            seen |= set(re.findall(r"warming \[#*\s*\] (\d+)/26 objects", _screen(tmux_session)))
            time.sleep(0.1)
        screen = _screen(tmux_session)
    finally:
        s3.latency = 0
    assert "EXIT=0" in screen and "warmed 26 objects" in screen, screen
    assert len(seen) >= 2, seen  # the bar moved while it ran


def test_ctrl_c_stops_a_warm_and_leaves_the_cache_consistent(s3, s3_path, client, tmux_session):
    write_dataset(s3, s3_path)
    s3.latency = 0.3
    try:
        _tmux("send-keys", "-t", tmux_session, _warm_command(s3, s3_path, client), "Enter")
        wait_for(lambda: re.search(r"warming \[#*\s*\] [1-9]", _screen(tmux_session)), 60)
        _tmux("send-keys", "-t", tmux_session, "C-c", "")
        wait_for(lambda: _exited(_screen(tmux_session)), 30)
        screen = _screen(tmux_session)
        assert "EXIT=130" in screen and "cancelled" in screen, screen
    finally:
        s3.latency = 0
    assert_consistent_then_finish(client, s3, s3_path)


def assert_consistent_then_finish(client, s3, s3_path):
    # Tasks already running finish; the rest never start. Then disks and index agree.
    wait_for(lambda: cluster_stats(client)["index"]["pending"] == 0, 30)
    time.sleep(1.5)  # a flush
    stats = cluster_stats(client)
    files = client.run(_files)
    assert {a: len(f) for a, f in files.items()} == {
        a: w["entries"] for a, w in stats["workers"].items()
    }
    assert stats["index"]["entries"] == stats["total"]["entries"]
    warmed = warm(client, from_url(s3, s3_path), progress=False)  # finishing the job
    assert warmed.skipped > 0 and warmed.skipped + warmed.chunks == 26


def test_a_warm_job_can_be_cancelled_from_code(s3, s3_path, client, monkeypatch):
    write_dataset(s3, s3_path)
    monkeypatch.setattr("dask_zarr_cache.warmup.BATCH", 2)  # 13 batches: most still queued
    s3.latency = 0.3
    try:
        job = warm(client, from_url(s3, s3_path), concurrency=1, progress=False, wait=False)
        wait_for(lambda: job.fetched > 0, 60)
        job.cancel()
        started = time.monotonic()
        report = job.result(timeout=60)
        assert time.monotonic() - started < 30  # promptly: running batches only
    finally:
        s3.latency = 0
    assert report.cancelled and 0 < report.chunks < 26 and job.done()
    assert_consistent_then_finish(client, s3, s3_path)


def _files(dask_worker):
    return sorted(f.key for f in dask_worker.extensions["zarr_cache"].disk.scan())


def test_the_dashboard_shows_a_warm_while_it_runs(s3, s3_path, client):
    from tests.observe.test_dashboard import _chrome, dashboard_base

    write_dataset(s3, s3_path)
    browser = _chrome()
    s3.latency = 0.2
    # One GET at a time per worker: ~9 x 0.2 s, long enough for the page to see it run.
    runner = threading.Thread(
        target=warm,
        args=(client, from_url(s3, s3_path)),
        kwargs={"progress": False, "concurrency": 1},
    )
    try:
        browser.get(dashboard_base(client) + "/individual-zarr-cache")
        runner.start()
        body = lambda: browser.find_element("tag name", "body").text  # noqa: E731
        wait_for(lambda: "warming:" in body(), timeout=30, interval=0.2)
        running = body()
        runner.join(120)
        wait_for(lambda: "warmed: 26 / 26" in body(), timeout=30, interval=0.2)
    finally:
        s3.latency = 0
        runner.join(120)
        browser.quit()
    assert re.search(r"warming: \d+ / 26 objects", running), running
