"""Cache files on real disks: hashed names, self-describing files, ownership of the folder."""

from __future__ import annotations

import shutil

import pytest

from dask_zarr_cache import CacheDirectoryError
from dask_zarr_cache.worker.disk import MARKER, DiskCache, checksum

EPOCH = b"e" * 16


@pytest.fixture
def disk(tmp_path):
    cache = DiskCache(tmp_path / "cache")
    cache.open()
    yield cache
    cache.close()


def test_write_then_read_round_trips_and_verifies(disk):
    crc = disk.write("ns\x00c/0", b"hello", EPOCH, 3)
    assert crc == checksum(b"hello")
    assert disk.read("ns\x00c/0", crc) == b"hello"
    assert disk.read("ns\x00c/0") == b"hello"
    assert disk.read("ns\x00c/1") is None
    [found] = disk.scan()
    assert (found.key, found.size, found.checksum, found.epoch, found.seq) == (
        "ns\x00c/0",
        5,
        crc,
        EPOCH,
        3,
    )
    assert not list((disk.root / "tmp").iterdir())


LEGAL_KEYS = [
    "ns\x00a",
    "ns\x00a/b",  # a file and a "directory" of the same name
    "ns\x00.tmp-1",
    "ns\x00..a/...",
    "ns\x00ünïcödé/c/0",
    "ns\x00tab\there\nnewline",
    "ns\x00" + "x" * 300,  # one component over 255 bytes
    "ns\x00" + "/".join(["d" * 200] * 25),  # over 4 KiB in all
    "ns\x00back\\slash",
    "ns\x00lone\udcffsurrogate",
]


def test_every_key_gets_its_own_file_inside_the_directory(disk):
    for i, key in enumerate(LEGAL_KEYS):
        disk.write(key, f"value {i}".encode(), EPOCH, 0)
    for i, key in enumerate(LEGAL_KEYS):
        assert disk.read(key) == f"value {i}".encode()
        assert disk.root in disk.path_of(key).parents
    assert sorted(f.key for f in disk.scan()) == sorted(LEGAL_KEYS)


def test_a_file_moved_or_swapped_on_disk_is_never_served_as_another_key(disk):
    disk.write("ns\x00a", b"bytes of a", EPOCH, 0)
    disk.write("ns\x00b", b"bytes of b", EPOCH, 0)
    a, b = disk.path_of("ns\x00a"), disk.path_of("ns\x00b")
    shutil.copy(a, b)  # b's file now holds a's key and bytes
    assert disk.read("ns\x00b") is None
    assert not b.exists()  # dropped, so the object is fetched again
    assert disk.read("ns\x00a") == b"bytes of a"
    shutil.copy(a, a.parent / ("0" * 62))  # a copy under a name that is no key's hash
    assert [f.key for f in disk.scan()] == ["ns\x00a"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-3],  # truncated
        lambda raw: b"X" + raw[1:],  # payload corrupted
        lambda raw: raw[:8] + b"?" + raw[9:],  # key corrupted
        lambda raw: raw + b"junk",  # trailing garbage
        lambda raw: b"",  # emptied
    ],
)
def test_damaged_files_are_never_returned_and_are_deleted(disk, damage):
    crc = disk.write("ns\x00k", b"payload", EPOCH, 0)
    path = disk.path_of("ns\x00k")
    path.write_bytes(damage(path.read_bytes()))
    assert disk.read("ns\x00k", crc) is None
    assert not path.exists()


def test_checksum_mismatch_with_the_entry_is_rejected(disk):
    crc = disk.write("ns\x00k", b"new", EPOCH, 0)
    assert disk.read("ns\x00k", crc + 1) is None


def test_scan_skips_damaged_and_temp_files(disk):
    disk.write("ns\x00good", b"1234", EPOCH, 0)
    disk.write("ns\x00bad", b"5678", EPOCH, 0)
    bad = disk.path_of("ns\x00bad")
    bad.write_bytes(bad.read_bytes()[:-1])
    (disk.root / "tmp" / "half-written").write_bytes(b"partial")
    assert [(f.key, f.size) for f in disk.scan()] == [("ns\x00good", 4)]
    assert not bad.exists() and not list((disk.root / "tmp").iterdir())


def test_a_folder_with_somebody_elses_files_is_refused_and_untouched(tmp_path):
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "results.csv").write_text("precious")
    (data / "objects").mkdir()
    (data / "objects" / "ab").mkdir()
    (data / "objects" / "ab" / "notes.txt").write_text("also precious")
    with pytest.raises(CacheDirectoryError, match="not a dask-zarr-cache directory"):
        DiskCache(data).open()
    assert sorted(p.name for p in data.rglob("*")) == ["ab", "notes.txt", "objects", "results.csv"]


def test_an_empty_folder_becomes_a_cache_and_is_recognised_again(tmp_path):
    first = DiskCache(tmp_path / "c")
    first.open()
    first.write("ns\x00k", b"v", EPOCH, 0)
    first.close()
    assert (tmp_path / "c" / MARKER).exists()
    again = DiskCache(tmp_path / "c")
    again.open()
    assert [f.key for f in again.scan()] == ["ns\x00k"]
    again.close()


def test_two_users_of_one_directory_are_refused(tmp_path):
    one = DiskCache(tmp_path / "c")
    one.open()
    with pytest.raises(CacheDirectoryError, match="in use"):
        DiskCache(tmp_path / "c").open()
    one.close()
    DiskCache(tmp_path / "c").open()


def test_delete_is_idempotent(disk):
    disk.write("ns\x00k", b"12345", EPOCH, 0)
    disk.delete("ns\x00k")
    disk.delete("ns\x00k")
    assert disk.read("ns\x00k") is None
