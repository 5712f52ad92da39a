from __future__ import annotations

import os

import pytest

from dask_zarr_cache import InvalidCacheKeyError
from dask_zarr_cache._disk import DiskCache, checksum


def test_write_then_read_round_trips_and_verifies(tmp_path):
    disk = DiskCache(tmp_path)
    crc = disk.write("ns/c/0", b"hello")
    assert crc == checksum(b"hello")
    assert disk.read("ns/c/0", crc) == b"hello"
    assert disk.read("ns/c/0") == b"hello"
    assert disk.read("ns/c/1") is None
    assert [f.key for f in disk.scan()] == ["ns/c/0"]
    assert not [p for p in tmp_path.rglob(".tmp-*")]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-3],  # truncated
        lambda raw: b"X" + raw[1:],  # payload corrupted
        lambda raw: raw + b"junk",  # trailing garbage
        lambda raw: b"",  # emptied
    ],
)
def test_damaged_files_are_never_returned_and_are_deleted(tmp_path, damage):
    disk = DiskCache(tmp_path)
    crc = disk.write("ns/k", b"payload-bytes")
    path = disk.path_of("ns/k")
    path.write_bytes(damage(path.read_bytes()))
    assert disk.read("ns/k", crc) is None
    assert not path.exists()


def test_checksum_mismatch_with_the_index_is_rejected(tmp_path):
    disk = DiskCache(tmp_path)
    crc = disk.write("ns/k", b"new")
    assert disk.read("ns/k", crc + 1) is None


def test_scan_skips_corrupt_and_temp_files(tmp_path):
    disk = DiskCache(tmp_path)
    disk.write("ns/good", b"1234")
    disk.write("ns/bad", b"5678")
    bad = disk.path_of("ns/bad")
    bad.write_bytes(bad.read_bytes()[:-1])
    (tmp_path / "ns" / ".tmp-abc").write_bytes(b"partial")
    files = list(disk.scan())
    assert [(f.key, f.size) for f in files] == [("ns/good", 4)]
    assert sorted(os.listdir(tmp_path / "ns")) == ["good"]


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../x", "a//b", "a\x00", "ns/.tmp-1", ""])
def test_paths_outside_the_cache_are_refused(tmp_path, key):
    disk = DiskCache(tmp_path / "cache")
    with pytest.raises(InvalidCacheKeyError):
        disk.path_of(key)
    with pytest.raises(InvalidCacheKeyError):
        disk.write(key, b"x")


def test_delete_reports_freed_bytes(tmp_path):
    disk = DiskCache(tmp_path)
    disk.write("ns/k", b"12345")
    assert disk.delete("ns/k") == 5
    assert disk.delete("ns/k") == 0
