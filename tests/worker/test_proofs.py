"""Checking files of an earlier cluster against a listing of their source (real files)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from zarr.storage import LocalStore

from dask_zarr_cache.core.loops import zarr_loop
from dask_zarr_cache.worker.entries import LocalEntry
from dask_zarr_cache.worker.proofs import check_against_source

PREFIX = "ns\x00data.zarr/"


@pytest.fixture
def source(tmp_path):
    """Three objects of 8 bytes, last modified an hour ago."""
    for name in ("0", "1", "2"):
        path = tmp_path / "c" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 8)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    return LocalStore(tmp_path)


def _check(entries, source, wait=5.0):
    """The check from a loop of its own (a worker's), as the worker runs it."""
    return asyncio.run(check_against_source(entries, PREFIX, source, 60.0, wait))


def test_only_files_of_unchanged_objects_read_after_the_margin_are_current(source, tmp_path):
    now = time.time()
    (tmp_path / "c" / "1").write_bytes(b"y" * 8)  # changed since: modified now
    entries = {
        f"{PREFIX}c/0": LocalEntry(8, 0, now),  # unchanged
        f"{PREFIX}c/1": LocalEntry(8, 0, now - 60),  # read before the change
        f"{PREFIX}c/2": LocalEntry(7, 0, now),  # another size
        f"{PREFIX}c/3": LocalEntry(8, 0, now),  # gone
        f"{PREFIX}c/0\x00bytes=0-3": LocalEntry(4, 0, now),  # a range of an unchanged one
    }
    current, stale = _check(entries, source)
    assert set(current) == {f"{PREFIX}c/0", f"{PREFIX}c/0\x00bytes=0-3"}
    assert set(stale) == {f"{PREFIX}c/1", f"{PREFIX}c/2", f"{PREFIX}c/3"}


def test_a_zarr_loop_slowed_by_load_does_not_cost_the_files(source):
    # zarr's loop starts nothing for 1.5 s (a hop of a read gives up after 1 s): the
    # check waits for it, and keeps what the listing shows unchanged.
    entries = {f"{PREFIX}c/0": LocalEntry(8, 0, time.time())}
    assert set(_check(entries, source)[0]) == {f"{PREFIX}c/0"}  # zarr's loop runs
    zarr_loop().call_soon_threadsafe(time.sleep, 1.5)
    current, stale = _check(entries, source)
    assert set(current) == {f"{PREFIX}c/0"} and not stale


def test_a_zarr_loop_that_never_starts_the_listing_shows_nothing_current(source):
    entries = {f"{PREFIX}c/0": LocalEntry(8, 0, time.time())}
    zarr_loop().call_soon_threadsafe(time.sleep, 1.0)
    current, stale = _check(entries, source, wait=0.2)
    assert not current and set(stale) == {f"{PREFIX}c/0"}
