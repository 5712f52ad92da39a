"""``ClusterCacheStore`` as a zarr store: zarr's own StoreTests, pickling, read-through."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

import pytest
from zarr.abc.store import OffsetByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.storage import FsspecStore, LocalStore, MemoryStore
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
    assert set(vars(clone)) == {"_store", "location"}
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


@pytest.fixture
async def worker_cache(tmp_path, monkeypatch):
    """A real scheduler, worker, index actor and ``WorkerCache`` in this test's loop.

    ``ClusterCacheStore`` finds its cache through ``get_worker()``, which only answers
    inside a task; here the lookup is pointed at this worker's real cache instead.
    """
    from distributed import Client, Scheduler, Worker

    from dask_zarr_cache import ZarrCachePlugin

    async with (
        Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler,
        Worker(scheduler.address, host="127.0.0.1", nthreads=2) as worker,
        Client(scheduler.address, asynchronous=True) as client,
    ):
        await client.register_plugin(ZarrCachePlugin(max_size="10MiB", directory=tmp_path / "c"))
        cache = worker.extensions["zarr_cache"]
        monkeypatch.setattr("dask_zarr_cache._store.worker_cache", lambda: cache)
        yield cache


class TestClusterCacheStoreOnWorker(TestClusterCacheStore):
    """The same StoreTests with every read going through a real worker's cache."""

    @pytest.fixture
    async def store(self, open_kwargs, worker_cache) -> ClusterCacheStore:
        return await self.store_cls.open(**open_kwargs)

    @pytest.fixture
    def source_root(self, tmp_path: Path) -> str:
        (tmp_path / "src").mkdir(exist_ok=True)
        return str(tmp_path / "src")

    @pytest.fixture
    def store_kwargs(self, source_root: str) -> dict[str, object]:
        return {"store": LocalStore(source_root)}

    @pytest.fixture
    def open_kwargs(self, source_root: str) -> dict[str, object]:
        return {"store_cls": LocalStore, "root": source_root}

    async def test_reads_were_cached(self, store, worker_cache) -> None:
        proto = default_buffer_prototype()
        await self.set(store, "c/0", Buffer.from_bytes(b"abcdef"))
        assert (await store.get("c/0", proto)).to_bytes() == b"abcdef"
        (store._store.root / "c/0").unlink()  # the source no longer has it ...
        assert (await store.get("c/0", proto)).to_bytes() == b"abcdef"  # ... the cache has
        assert worker_cache.counters.hits == 1 and worker_cache.counters.remote_reads == 1


def test_no_inherited_read_path_bypasses_the_cache():
    # zarr may grow sync fast paths (``get_sync``, as LocalStore has) or new bulk reads on
    # WrapperStore that delegate straight to the source. Every read entry point the
    # wrapper has must be ClusterCacheStore's own, so an upgrade cannot silently skip the
    # cache; this test fails first if one appears.
    from zarr.storage import WrapperStore

    reads = [n for n in dir(WrapperStore) if n.startswith(("get", "_get")) and "size" not in n]
    for name in reads:
        owner = next(c for c in ClusterCacheStore.__mro__ if name in vars(c))
        assert owner in (ClusterCacheStore, Store), f"{name} comes from {owner.__name__}"


def test_from_url_opens_fsspec_urls_and_local_paths(tmp_path):
    import zarr

    zarr.create_array(LocalStore(tmp_path / "a.zarr"), shape=(4,), dtype="i4")[...] = 7
    for url in (str(tmp_path / "a.zarr"), f"file://{tmp_path}/a.zarr"):
        store = ClusterCacheStore.from_url(url)
        assert store.read_only
        assert zarr.open_array(store, mode="r")[...].tolist() == [7] * 4
    assert ClusterCacheStore.from_url(str(tmp_path / "a.zarr")).location == store.location
    writable = ClusterCacheStore.from_url(f"file://{tmp_path}/a.zarr", read_only=False)
    zarr.open_array(writable, mode="r+")[...] = 8
    assert zarr.open_array(store, mode="r")[...].tolist() == [8] * 4


def test_from_url_refuses_storage_options_for_a_local_path(tmp_path):
    from dask_zarr_cache import CacheConfigError

    with pytest.raises(CacheConfigError, match="storage_options"):
        ClusterCacheStore.from_url(str(tmp_path), storage_options={"anon": True})


def test_no_inherited_write_path_skips_the_invalidation():
    # The same guard for writes: a sync write fast path zarr may add to WrapperStore
    # (``set_sync``, ``delete_sync``) would write the source without telling the cluster.
    from zarr.storage import WrapperStore

    prefixes = ("set", "_set", "delete", "_delete", "clear")
    writes = [n for n in dir(WrapperStore) if n.startswith(prefixes)]
    assert {"set", "delete", "delete_dir", "clear"} <= set(writes)
    for name in writes:
        owner = next(c for c in ClusterCacheStore.__mro__ if name in vars(c))
        assert owner in (ClusterCacheStore, Store), f"{name} comes from {owner.__name__}"


class _RangeRefusingStore(FsspecStore):
    """A source whose server refuses "from byte 0" (some HTTP servers do, for empty objects)."""

    refused = 0

    async def get(self, key, prototype, byte_range=None):
        if isinstance(byte_range, OffsetByteRequest):
            type(self).refused += 1
            raise RuntimeError("416 Range Not Satisfiable")
        return await super().get(key, prototype, byte_range)


@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_a_source_refusing_a_range_from_byte_0_is_read_plainly(tmp_path, worker_cache):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty").write_bytes(b"")
    (tmp_path / "src" / "full").write_bytes(b"abcdef")
    source = FsspecStore.from_url(f"file://{tmp_path / 'src'}", read_only=True)
    source.__class__ = _RangeRefusingStore
    store = ClusterCacheStore(source)
    proto = default_buffer_prototype()
    assert (await store.get("full", proto)).to_bytes() == b"abcdef"
    assert (await store.get("empty", proto)).to_bytes() == b""
    assert await store.get("missing", proto) is None
    assert _RangeRefusingStore.refused == 3  # each whole read tried one GET first
    assert (await store.get("full", proto)).to_bytes() == b"abcdef"  # now from the cache
    assert worker_cache.counters.hits >= 1 and _RangeRefusingStore.refused == 3
