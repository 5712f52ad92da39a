"""Cache keys: the grammar of zarr keys, namespaces, byte ranges and prefixes."""

from __future__ import annotations

import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import MemoryStore

from dask_zarr_cache import CacheConfigError, ClusterCacheStore, InvalidCacheKeyError
from dask_zarr_cache.identity.keys import (
    IMMUTABLE,
    base_key,
    is_immutable,
    object_key,
    validate_key,
)
from dask_zarr_cache.identity.stores import SourceLocation

LOC = SourceLocation("ns", "bucket/data.zarr")


def key_of(location, key, byte_range=None):
    return location.read_key(None, key, byte_range)


@pytest.mark.parametrize(
    "key",
    ["zarr.json", "c/0/0", ".zarray", "a/.zattrs", ".tmp-1", "..a/b..", "x y/ü", "t\tab", "a#b"],
)
def test_zarr_keys_are_valid(key):
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key", ["/etc/passwd", "../x", "a/../../b", "a/./b", "a//b", "a/", "a\x00b", 3]
)
def test_keys_that_are_not_zarr_keys_are_rejected(key):
    with pytest.raises(InvalidCacheKeyError):
        validate_key(key)
    with pytest.raises(InvalidCacheKeyError):
        key_of(LOC, key)


def test_cache_keys_for_objects_and_ranges():
    assert key_of(LOC, "c/0") == "ns\x00bucket/data.zarr/c/0"
    assert key_of(LOC, "c/0", RangeByteRequest(10, 20)) == "ns\x00bucket/data.zarr/c/0\x00r10-20"
    assert key_of(LOC, "c/0", OffsetByteRequest(5)).endswith("\x00o5")
    assert key_of(LOC, "c/0", SuffixByteRequest(16)).endswith("\x00s16")
    assert base_key(key_of(LOC, "c/0", SuffixByteRequest(16))) == key_of(LOC, "c/0")
    # Not cacheable: the source must answer (or raise) itself.
    assert key_of(LOC, "c/0", (0, 2)) is None  # type: ignore[arg-type]
    assert key_of(LOC, "c/0", RangeByteRequest(5, 1)) is None
    # '#' is an ordinary character now.
    assert key_of(LOC, "we#ird") != key_of(LOC, "we")
    assert object_key("ns", "bucket/data.zarr/c/0") == key_of(LOC, "c/0")


def test_prefixes_cover_exactly_what_is_below():
    below = LOC.prefix("a")
    assert key_of(LOC, "a/b").startswith(below)
    assert key_of(LOC, "a/b", RangeByteRequest(0, 1)).startswith(below)
    assert not key_of(LOC, "ab/c").startswith(below)
    assert key_of(LOC, "ab/c").startswith(LOC.prefix(""))
    other_root = SourceLocation("ns", "bucket/data.zarr2")
    assert not key_of(other_root, "x").startswith(LOC.prefix(""))


def test_a_write_names_the_whole_objects_and_prefixes_it_replaces():
    keys, prefixes = LOC.written(["c/0", ""], ["a"])
    assert keys == [key_of(LOC, "c/0")]
    assert prefixes == [LOC.prefix("a"), LOC.prefix("")]  # delete("") drops everything
    with pytest.raises(InvalidCacheKeyError):
        LOC.written(["../x"], [])


def test_immutable_namespaces_are_marked_and_cannot_be_given_by_users():
    assert is_immutable(object_key(IMMUTABLE + "snap", "k"))
    assert not is_immutable(key_of(LOC, "c/0"))
    with pytest.raises(CacheConfigError):
        ClusterCacheStore(MemoryStore(), namespace=IMMUTABLE + "x")


@pytest.mark.parametrize("namespace", ["era5#v2", "..", "tab\there", "a/b", "ü"])
def test_user_namespaces_are_accepted_and_kept_apart(namespace):
    store = ClusterCacheStore(MemoryStore(), namespace=namespace)
    assert store.namespace == namespace
    assert store.cache_key("k") != key_of(SourceLocation(namespace + "x"), "k")


@pytest.mark.parametrize("namespace", ["", "a\x00b", 3])
def test_bad_user_namespaces_are_refused_up_front(namespace):
    with pytest.raises(CacheConfigError, match="namespace"):
        ClusterCacheStore(MemoryStore(), namespace=namespace)
