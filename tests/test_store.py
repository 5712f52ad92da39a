"""``ClusterCacheStore`` as a zarr store: zarr's own StoreTests, pickling, read-through."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.storage import LocalStore, MemoryStore
from zarr.testing.store import StoreTests

from dask_zarr_cache import ClusterCacheStore, InvalidCacheKeyError

if TYPE_CHECKING:
    from pathlib import Path


class TestClusterCacheStore(StoreTests[ClusterCacheStore, Buffer]):
    """zarr's StoreTests, with a LocalStore source, outside any worker (read-through)."""

    store_cls = ClusterCacheStore
    buffer_cls = Buffer

    async def get(self, store: ClusterCacheStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes((store._store.root / key).read_bytes())

    async def set(self, store: ClusterCacheStore, key: str, value: Buffer) -> None:
        path = store._store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, object]:
        return {"store": LocalStore(str(tmp_path))}

    @pytest.fixture
    def open_kwargs(self, tmp_path: Path) -> dict[str, object]:
        return {"store_cls": LocalStore, "root": str(tmp_path)}

    def test_store_repr(self, store: ClusterCacheStore) -> None:
        assert repr(store) == f"ClusterCacheStore({store._store!r})"
        assert str(store) == f"cluster-cache::{store._store}"

    def test_store_supports_writes(self, store: ClusterCacheStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ClusterCacheStore) -> None:
        assert store.supports_listing


def test_pickles_to_source_and_namespace_only(tmp_path):
    store = ClusterCacheStore(LocalStore(tmp_path), namespace="ns-mine")
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone.namespace == "ns-mine"
    assert set(vars(clone)) == {"_store", "namespace"}
    assert len(pickle.dumps(store)) < 600


def test_memory_store_namespace_survives_pickling():
    store = ClusterCacheStore(MemoryStore())
    assert pickle.loads(pickle.dumps(store)).namespace == store.namespace


def test_wrapping_a_non_store_is_a_type_error():
    with pytest.raises(TypeError, match="wraps a zarr Store"):
        ClusterCacheStore({"not": "a store"})  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["../secret", "/etc/passwd", "a/../../b", "a\x00"])
async def test_escaping_keys_are_rejected_for_reads_and_writes(tmp_path, key):
    store = ClusterCacheStore(LocalStore(tmp_path / "data"))
    proto = default_buffer_prototype()
    with pytest.raises(InvalidCacheKeyError):
        await store.get(key, proto)
    with pytest.raises(InvalidCacheKeyError):
        await store.set(key, Buffer.from_bytes(b"x"))
    with pytest.raises(InvalidCacheKeyError):
        await store.delete(key)
    assert not any((tmp_path).rglob("secret"))
