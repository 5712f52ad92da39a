"""Cache identity: one object, one key, whatever store object names it."""

from __future__ import annotations

import gc

import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, MemoryStore, ZipStore

from dask_zarr_cache import CacheConfigError, ClusterCacheStore, InvalidCacheKeyError
from dask_zarr_cache._keys import (
    SourceLocation,
    base_key,
    cache_key,
    cache_prefix,
    source_location,
    validate_key,
)

LOC = SourceLocation("ns", "bucket/data.zarr")


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


def test_cache_keys_for_objects_and_ranges():
    assert cache_key(LOC, "c/0") == "ns\x00bucket/data.zarr/c/0"
    assert cache_key(LOC, "c/0", RangeByteRequest(10, 20)) == "ns\x00bucket/data.zarr/c/0\x00r10-20"
    assert cache_key(LOC, "c/0", OffsetByteRequest(5)).endswith("\x00o5")
    assert cache_key(LOC, "c/0", SuffixByteRequest(16)).endswith("\x00s16")
    assert base_key(cache_key(LOC, "c/0", SuffixByteRequest(16))) == cache_key(LOC, "c/0")
    # Not cacheable: the source must answer (or raise) itself.
    assert cache_key(LOC, "c/0", (0, 2)) is None  # type: ignore[arg-type]
    assert cache_key(LOC, "c/0", RangeByteRequest(5, 1)) is None
    # '#' is an ordinary character now.
    assert cache_key(LOC, "we#ird") != cache_key(LOC, "we")


def test_prefixes_cover_exactly_what_is_below():
    below = cache_prefix(LOC, "a")
    assert cache_key(LOC, "a/b").startswith(below)
    assert cache_key(LOC, "a/b", RangeByteRequest(0, 1)).startswith(below)
    assert not cache_key(LOC, "ab/c").startswith(below)
    assert cache_key(LOC, "ab/c").startswith(cache_prefix(LOC, ""))
    other_root = SourceLocation("ns", "bucket/data.zarr2")
    assert not cache_key(other_root, "x").startswith(cache_prefix(LOC, ""))


def s3(path, **options):
    base = {
        "endpoint_url": "http://127.0.0.1:1",
        "key": "k",
        "secret": "s",
        "skip_instance_cache": True,
    }
    return FsspecStore.from_url(f"s3://{path}", storage_options={**base, **options})


def test_one_object_one_key_whatever_the_store_object():
    key_of = lambda store, key: cache_key(source_location(store), key)  # noqa: E731
    reference = key_of(s3("bkt/data.zarr"), "arr/c/0")
    assert key_of(s3("bkt/data.zarr", key="other", secret="creds"), "arr/c/0") == reference
    assert key_of(s3("bkt/data.zarr/"), "arr/c/0") == reference  # trailing slash
    assert key_of(s3("bkt/data.zarr/arr"), "c/0") == reference  # rooted at the array
    read_only = FsspecStore.from_url(
        "s3://bkt/data.zarr",
        read_only=True,
        storage_options={"endpoint_url": "http://127.0.0.1:1/", "anon": True},
    )
    assert key_of(read_only, "arr/c/0") == reference
    # Another endpoint or another bucket is other data.
    assert key_of(s3("bkt/data.zarr", endpoint_url="http://127.0.0.1:2"), "arr/c/0") != reference
    assert key_of(s3("other/data.zarr"), "arr/c/0") != reference


def test_local_paths_are_canonical(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    one = source_location(LocalStore(tmp_path / "d"))
    assert source_location(LocalStore(str(tmp_path / "d") + "/")) == one
    assert source_location(LocalStore(tmp_path / "link")) == one
    assert cache_key(source_location(LocalStore(tmp_path)), "d/x") == cache_key(one, "x")
    assert source_location(FsspecStore.from_url(f"file://{tmp_path}/d")) == one


def test_in_memory_sources_never_share_an_identity():
    seen = set()
    for _ in range(50):  # Python reuses ids of freed objects; identities are never reused
        store = MemoryStore()
        seen.add(source_location(store).namespace)
        del store
        gc.collect()
    assert len(seen) == 50
    store = MemoryStore()
    assert source_location(store) == source_location(store)  # one object, one identity


def test_zip_stores_are_named_by_their_file(tmp_path):
    one = source_location(ZipStore(tmp_path / "a.zip", mode="w"))
    assert one == source_location(ZipStore(tmp_path / "a.zip", mode="w"))
    assert one != source_location(ZipStore(tmp_path / "b.zip", mode="w"))


def test_a_source_of_unknown_identity_needs_a_namespace():
    from zarr.abc.store import Store

    class Mystery(MemoryStore):
        pass

    stubs = dict.fromkeys(Store.__abstractmethods__)
    unknown = type("Unknown", (Store,), stubs).__new__(type("Unknown", (Store,), stubs))
    with pytest.raises(CacheConfigError, match="namespace="):
        source_location(unknown)
    with pytest.raises(CacheConfigError, match="namespace="):
        ClusterCacheStore(unknown)
    assert ClusterCacheStore(Mystery(), namespace="era5#v2").namespace == "era5#v2"


@pytest.mark.parametrize("namespace", ["era5#v2", "..", "tab\there", "a/b", "ü"])
def test_user_namespaces_are_accepted_and_kept_apart(namespace):
    store = ClusterCacheStore(MemoryStore(), namespace=namespace)
    assert store.namespace == namespace
    assert cache_key(store.location, "k") != cache_key(SourceLocation(namespace + "x"), "k")


@pytest.mark.parametrize("namespace", ["", "a\x00b", 3])
def test_bad_user_namespaces_are_refused_up_front(namespace):
    with pytest.raises(CacheConfigError, match="namespace"):
        ClusterCacheStore(MemoryStore(), namespace=namespace)
