"""The client-side verbs ``cached`` and ``evict`` (and their commands) on real parts.

A process cluster over loopback S3, GETs counted at the server; the commands run in a
real terminal (tmux).
"""

from __future__ import annotations

import re
import sys
import time

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from dask_zarr_cache import (
    InvalidCacheKeyError,
    ZarrCacheError,
    cached,
    cluster_stats,
    evict,
)
from tests.conftest import chunk_gets
from tests.test_warmup import (
    _exited,
    _screen,
    _tmux,
    from_url,
    storage_options,
    tmux_session,  # noqa: F401  (a fixture)
    write_dataset,
)
from tests.test_worker_faults import wait_for


def _sizes(s3, s3_path, variable: str) -> dict[str, int]:
    """Source sizes of the chunk objects of ``variable``."""
    fs = s3.filesystem()
    return {p: int(i["size"]) for p, i in fs.find(f"{s3_path}/{variable}/c", detail=True).items()}


def _read(client, store, variable: str) -> float:
    opened = xr.open_zarr(store, consolidated=False, chunks={})
    return float(client.compute(opened[variable].sum()).result())


def test_cached_and_evict_per_variable_with_gets_counted_at_the_server(s3, s3_path, client):
    ds = write_dataset(s3, s3_path)
    store = from_url(s3, s3_path)
    temp, wind = _sizes(s3, s3_path, "temp"), _sizes(s3, s3_path, "wind")
    assert len(temp) == len(wind) == 12
    evict(client, store)  # whatever an earlier test of this cluster left
    before = cached(client, store)
    assert before.variables["temp"].cached_objects == 0 and before.total.fraction == 0.0
    assert before.variables["temp"].objects == 12
    assert before.variables["temp"].bytes == sum(temp.values())

    np.testing.assert_allclose(_read(client, store, "temp"), ds.temp.sum())
    wait_for(lambda: cached(client, store).variables["temp"].cached_objects == 12)
    status = cached(client, store)
    assert status.variables["temp"].fraction == 1.0
    assert status.variables["wind"].cached_objects == 0
    assert 0 < status.total.fraction < 1
    assert cached(client, store, ["wind"]).variables.keys() == {"wind"}

    np.testing.assert_allclose(_read(client, store, "wind"), ds.wind.sum())
    wait_for(lambda: cached(client, store).variables["wind"].cached_objects == 12)
    report = evict(client, store, "temp")
    assert report.objects == 12 and report.bytes == sum(temp.values())
    assert sum(w["objects"] for w in report.workers.values()) == 12 and not report.unreached
    after = cached(client, store)  # right away: the workers told the index before answering
    assert after.variables["temp"].cached_objects == 0
    assert after.variables["wind"].cached_objects == 12
    assert cluster_stats(client)["index"]["entries"] == cluster_stats(client)["total"]["entries"]

    s3.reset_counts()
    np.testing.assert_allclose(_read(client, store, "temp"), ds.temp.sum())
    np.testing.assert_allclose(_read(client, store, "wind"), ds.wind.sum())
    gets = chunk_gets(s3, s3_path)
    assert {k for k in gets if "/temp/c/" in k} == set(temp)  # evicted: read again ...
    assert {gets[k] for k in temp} == {1}  # ... once each, cluster-wide
    assert not [k for k in gets if "/wind/c/" in k]  # never evicted: no GET


def test_evict_refuses_bad_prefixes_and_clusters_without_the_plugin(s3, s3_path, client):
    write_dataset(s3, s3_path)
    store = from_url(s3, s3_path)
    with pytest.raises(InvalidCacheKeyError):
        evict(client, store, "temp/../wind")
    with (
        LocalCluster(
            n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0"
        ) as lc,
        Client(lc) as plain,
    ):
        with pytest.raises(ZarrCacheError, match="not registered"):
            evict(plain, store)
        with pytest.raises(ZarrCacheError, match="not registered"):
            cached(plain, store)


# -- the commands, in a terminal -------------------------------------------------------------
def _run_in_terminal(session: str, command: str, timeout: float = 60.0) -> str:
    _tmux("send-keys", "-t", session, "clear", "Enter")
    _tmux("send-keys", "-t", session, f"{command}; echo EXIT=$?", "Enter")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _exited(_screen(session)):
        time.sleep(0.1)
    return _screen(session)


def test_status_and_evict_commands_in_a_terminal(s3, s3_path, client, tmux_session):  # noqa: F811
    ds = write_dataset(s3, s3_path)
    store = from_url(s3, s3_path)
    np.testing.assert_allclose(_read(client, store, "wind"), ds.wind.sum())
    wait_for(lambda: cached(client, store).variables["wind"].cached_objects == 12)
    options = " ".join(f"'{o}'" for o in storage_options(s3))
    base = f"--scheduler {client.scheduler.address} {options}"
    cli = f"{sys.executable} -m dask_zarr_cache.cli"

    screen = _run_in_terminal(tmux_session, f"{cli} status s3://{s3_path} {base}")
    assert "EXIT=0" in screen, screen
    assert re.search(r"^wind\s+12/12\s.*100\.0$", screen, re.MULTILINE), screen
    assert re.search(r"^temp\s+0/12\s.*0\.0$", screen, re.MULTILINE), screen

    screen = _run_in_terminal(tmux_session, f"{cli} evict s3://{s3_path} --prefix wind {base}")
    assert "EXIT=0" in screen and "evicted 12 objects" in screen, screen
    assert cached(client, store).variables["wind"].cached_objects == 0

    screen = _run_in_terminal(tmux_session, f"{cli} evict s3://{s3_path}-nope {base}")
    assert "EXIT=3" in screen and "cannot read" in screen, screen
