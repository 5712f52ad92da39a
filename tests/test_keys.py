from __future__ import annotations

import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from dask_zarr_cache import InvalidCacheKeyError
from dask_zarr_cache._keys import base_key, cache_key, namespace_of, validate_key


@pytest.mark.parametrize(
    "key", ["zarr.json", "c/0/0", "foo/c/0.0", ".zarray", "a/.zattrs", "0.0.0", "x y/ü"]
)
def test_zarr_keys_are_valid(key):
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x", "a/../../b", "a/./b", "a//b", "a/", "a\x00b", "a\\b", "a\nb", 3],
)
def test_escaping_or_odd_keys_are_rejected(key):
    with pytest.raises(InvalidCacheKeyError):
        validate_key(key)


def test_cache_keys_for_objects_and_ranges():
    assert cache_key("ns", "c/0") == "ns/c/0"
    assert cache_key("ns", "c/0", RangeByteRequest(10, 20)) == "ns/c/0#r10-20"
    assert cache_key("ns", "c/0", OffsetByteRequest(5)) == "ns/c/0#o5"
    assert cache_key("ns", "c/0", SuffixByteRequest(16)) == "ns/c/0#s16"
    assert base_key("ns/c/0#s16") == "ns/c/0"
    # Not cacheable: the source must answer (or raise) itself.
    assert cache_key("ns", "c/0", (0, 2)) is None  # type: ignore[arg-type]
    assert cache_key("ns", "c/0", RangeByteRequest(5, 1)) is None
    assert cache_key("ns", "we#ird") is None


def test_distinct_ranges_have_distinct_keys():
    keys = {
        cache_key("ns", "k", r)
        for r in [
            None,
            RangeByteRequest(0, 10),
            RangeByteRequest(0, 11),
            OffsetByteRequest(0),
            SuffixByteRequest(10),
        ]
    }
    assert len(keys) == 5


def test_namespaces_separate_sources(tmp_path):
    a, b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    assert namespace_of(a) != namespace_of(b)
    assert namespace_of(a) == namespace_of(LocalStore(tmp_path / "a"))
    assert namespace_of(MemoryStore()) != namespace_of(MemoryStore())


def test_namespaces_include_the_s3_endpoint():
    opts = {"key": "k", "secret": "s", "skip_instance_cache": True}
    one = FsspecStore.from_url(
        "s3://bkt/x.zarr", storage_options={**opts, "endpoint_url": "http://127.0.0.1:1"}
    )
    two = FsspecStore.from_url(
        "s3://bkt/x.zarr", storage_options={**opts, "endpoint_url": "http://127.0.0.1:2"}
    )
    same = FsspecStore.from_url(
        "s3://bkt/x.zarr", storage_options={**opts, "endpoint_url": "http://127.0.0.1:1"}
    )
    other_path = FsspecStore.from_url(
        "s3://bkt/y.zarr", storage_options={**opts, "endpoint_url": "http://127.0.0.1:1"}
    )
    assert namespace_of(one) == namespace_of(same)
    assert len({namespace_of(s) for s in (one, two, other_path)}) == 3
