"""Listing a source directory with sizes and times, per kind of store, on real stores."""

from __future__ import annotations

import os
import time

import pytest
import zarr.core.sync
from zarr.storage import LocalStore, MemoryStore

from dask_zarr_cache.identity.listing import list_directory
from tests.conftest import obstore_s3, s3_store


def _put(store, key: str, data: bytes) -> None:
    from zarr.core.buffer import default_buffer_prototype

    zarr.core.sync.sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _listed(store, directory: str):
    return zarr.core.sync.sync(list_directory(store, directory))


def _check(store) -> None:
    before = time.time() - 5  # object stores date with second precision, clocks differ
    _put(store, "v/c/0", b"12345")
    _put(store, "v/c/1", b"12")
    _put(store, "v/c/sub/2", b"1")  # below: not in the directory itself
    found = _listed(store, "v/c")
    assert {name: o.size for name, o in found.items()} == {"0": 5, "1": 2}
    assert all(before <= o.modified <= time.time() + 5 for o in found.values())
    assert _listed(store, "v/nowhere") == {}


def test_local_store(tmp_path):
    _check(LocalStore(str(tmp_path)))
    os.utime(tmp_path / "v/c/0", (1_000_000, 1_000_000))
    assert _listed(LocalStore(str(tmp_path)), "v/c")["0"].modified == 1_000_000


def test_fsspec_s3_store(s3, s3_path):
    _check(s3_store(s3, s3_path))


def test_obstore_s3_store(s3, s3_path):
    from zarr.storage import ObjectStore

    _check(ObjectStore(obstore_s3(s3, s3_path)))


def test_stores_without_times_show_nothing():
    assert _listed(MemoryStore(), "v/c") is None


def test_wrappers_list_their_store(tmp_path):
    from zarr.storage import LoggingStore

    _check(LoggingStore(LocalStore(str(tmp_path))))


@pytest.mark.parametrize("directory", ["", "v"])
def test_the_root_and_a_level_list_only_files(tmp_path, directory):
    store = LocalStore(str(tmp_path))
    _put(store, "zarr.json", b"{}")
    _put(store, "v/zarr.json", b"{}")
    assert set(_listed(store, directory)) == {"zarr.json"}
