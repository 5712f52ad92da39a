"""DatasetCoverage's logic with a fake worker listing and index (the real path: test_dashboard)."""

from __future__ import annotations

import asyncio

from dask_zarr_cache.core.protocol import DatasetObjects
from dask_zarr_cache.observe.coverage import DatasetCoverage, VariableStatus, status_of

OBJECTS = {
    "t": {"t/c/0": ("ds/t/c/0", 10), "t/c/1": ("ds/t/c/1", 30)},
    "inline": {"inline/c/0": (None, 5)},  # not cached by name: never counted cached
}


def test_status_counts_objects_and_bytes_per_variable():
    status = status_of(OBJECTS, {"ds/t/c/0": False, "ds/t/c/1": True})
    assert status.variables == {
        "t": VariableStatus(2, 40, 1, 30),
        "inline": VariableStatus(1, 5, 0, 0),
    }
    assert status.total == VariableStatus(3, 45, 1, 30) and status.total.fraction == 30 / 45


async def test_refreshes_only_while_viewed_and_once_per_interval():
    listings, held = [], {"ds/t/c/0": True, "ds/t/c/1": False}

    async def describe(dataset):
        listings.append(dataset)
        if dataset == b"broken":
            raise OSError("the source did not answer")
        return DatasetObjects("s3://ds", OBJECTS)

    async def cached(keys):
        return [held[k] for k in keys]

    coverage = DatasetCoverage(describe, cached, interval=3600)
    coverage.add("ds/", b"ds")
    coverage.add("ds/", b"again")  # one dataset per prefix: the first store stays
    await asyncio.sleep(0.01)
    assert listings == []  # nobody looked
    assert coverage.latest() == {}  # the first look starts a listing
    await asyncio.sleep(0.01)
    found = coverage.latest()
    assert listings == [b"ds"] and found["s3://ds"][""]["cached_bytes"] == 10
    held["ds/t/c/1"] = True
    await asyncio.sleep(0.01)
    assert coverage.latest() == found and listings == [b"ds"]  # not due again yet

    coverage.interval = 0
    coverage.add("broken/", b"broken")
    coverage.latest()
    await asyncio.sleep(0.01)
    again = coverage.latest()
    assert listings[1:] == [b"ds", b"broken"]
    assert list(again) == ["s3://ds"] and again["s3://ds"][""]["cached_bytes"] == 40
    await coverage.close()
