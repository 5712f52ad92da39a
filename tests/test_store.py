"""``ClusterCacheStore`` as a zarr store: zarr's own StoreTests, pickling, read-through."""

from __future__ import annotations

import asyncio
import functools
import inspect
import pickle
from typing import TYPE_CHECKING

import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store
from zarr.core.buffer import BufferPrototype, default_buffer_prototype
from zarr.core.buffer.cpu import Buffer, NDBuffer
from zarr.storage import FsspecStore, LocalStore, MemoryStore
from zarr.testing.store import StoreTests

from dask_zarr_cache import CacheConfigError, ClusterCacheStore, InvalidCacheKeyError
from dask_zarr_cache.identity.keys import IMMUTABLE, is_immutable
from dask_zarr_cache.identity.stores import ReadThrough, declared_immutable
from tests.conftest import obstore_s3

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


def test_a_store_declared_immutable_names_its_objects_apart_and_never_expires(tmp_path):
    plain = ClusterCacheStore(LocalStore(tmp_path))
    fixed = ClusterCacheStore(LocalStore(tmp_path), immutable=True)
    key = fixed.cache_key("c/0")
    assert is_immutable(key) and not is_immutable(plain.cache_key("c/0"))
    assert key != plain.cache_key("c/0")  # an undeclared store's entries could change
    assert pickle.loads(pickle.dumps(fixed)).cache_key("c/0") == key
    assert ClusterCacheStore(LocalStore(tmp_path), namespace="v1", immutable=True).namespace == (
        IMMUTABLE + "v1"
    )


def test_immutable_is_refused_for_stores_not_named_by_location():
    with pytest.raises(CacheConfigError, match="immutable=True applies"):
        declared_immutable(ReadThrough("a writable session"))


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


def _in_a_thread(test):
    """A test whose body runs in a thread (on an event loop of its own, if it is async).

    zarr's synchronous store API blocks its caller; the scheduler, the worker and the
    client that writes are announced through all run on this test's event loop, which
    must keep running meanwhile.
    """

    @functools.wraps(test)
    async def run(*args, **kwargs):
        if inspect.iscoroutinefunction(test):
            await asyncio.to_thread(asyncio.run, test(*args, **kwargs))
        else:
            await asyncio.to_thread(test, *args, **kwargs)

    return run


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


for _name, _test in vars(StoreTests).items():
    if _name.startswith("test_") and "sync" in _name:
        setattr(TestClusterCacheStoreOnWorker, _name, _in_a_thread(_test))


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


#: What ``WrapperStore`` may pass to the source unchanged: members that read no object's
#: bytes and write nothing (listing, existence, flags, lifecycle). Reviewed by hand: a
#: member zarr adds to ``WrapperStore`` is not here, so the test below fails until it is
#: routed through the cache or added here with a reason.
PASS_THROUGH = {
    "_abc_impl", "_check_writable", "_ensure_open", "_is_open", "_open", "close", "exists",
    "is_empty", "list", "list_dir", "list_prefix", "open", "read_only", "supports_deletes",
    "supports_listing", "supports_writes", "with_read_only",
}  # fmt: skip


def test_no_inherited_method_bypasses_the_cache():
    # zarr grows WrapperStore methods that delegate straight to the source (3.2 added
    # get_ranges, get_sync, set_sync and delete_sync): a read there skips the cache, a
    # write skips the invalidation. Every other member must be ClusterCacheStore's own.
    from zarr.storage import WrapperStore

    members = {n for n in vars(WrapperStore) if not n.startswith("__")} | {"__eq__"}
    routed = members - PASS_THROUGH
    assert {"get", "get_partial_values", "set", "delete", "delete_dir", "clear"} <= routed
    for name in sorted(routed):
        owner = next(c for c in ClusterCacheStore.__mro__ if name in vars(c))
        assert owner is ClusterCacheStore, f"{name} comes from {owner.__name__}"


async def test_the_sync_store_api_goes_through_the_cache(tmp_path, worker_cache):
    (tmp_path / "src").mkdir()
    store = ClusterCacheStore(LocalStore(tmp_path / "src"))
    (tmp_path / "src" / "k").write_bytes(b"old")
    # zarr's sync API blocks its caller: from a thread, as zarr's sync codec pipeline would.
    assert (await asyncio.to_thread(store.get_sync, "k")).to_bytes() == b"old"
    assert (await asyncio.to_thread(store.get_sync, "k")).to_bytes() == b"old"
    assert worker_cache.counters.remote_reads == 1 and worker_cache.counters.hits == 1
    await asyncio.to_thread(store.set_sync, "k", Buffer.from_bytes(b"new"))
    assert (tmp_path / "src" / "k").read_bytes() == b"new"
    assert (await store.get("k", default_buffer_prototype())).to_bytes() == b"new"
    await asyncio.to_thread(store.delete_sync, "k")
    assert await store.get("k", default_buffer_prototype()) is None
    assert worker_cache.counters.entries == 0
    assert not store._supports_sync_io  # zarr itself keeps to the asynchronous methods


@pytest.mark.skipif(not hasattr(Store, "get_ranges"), reason="zarr < 3.2 has no get_ranges")
async def test_get_ranges_reads_through_the_cache(tmp_path, worker_cache):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "shard").write_bytes(bytes(range(200)) * 10_000)
    store = ClusterCacheStore(LocalStore(tmp_path / "src"))
    ranges = [
        RangeByteRequest(0, 10),
        RangeByteRequest(20, 30),
        RangeByteRequest(1_500_000, 1_500_004),
    ]
    expected = (tmp_path / "src" / "shard").read_bytes()
    for _ in range(3):
        got = {}
        async for group in store.get_ranges("shard", ranges, prototype=default_buffer_prototype()):
            got.update((i, buf.to_bytes()) for i, buf in group)
        assert got == {i: expected[r.start : r.end] for i, r in enumerate(ranges)}
    reads = worker_cache.counters.remote_reads
    assert reads == 2  # two merged ranges (nearby ones merge), each read from the source once
    assert worker_cache.counters.hits == 2 * reads


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


class _OnWorkerOverAnySource(TestClusterCacheStoreOnWorker):
    """Helpers read and write through the source store itself, not the cache."""

    async def get(self, store: ClusterCacheStore, key: str) -> Buffer:
        return await store._store.get(key, default_buffer_prototype())

    async def set(self, store: ClusterCacheStore, key: str, value: Buffer) -> None:
        await store._store.set(key, value)

    def test_store_repr(self, store: ClusterCacheStore) -> None:
        assert repr(store) == f"ClusterCacheStore({store._store!r})"

    async def test_reads_were_cached(self, store, worker_cache) -> None:
        proto = default_buffer_prototype()
        await self.set(store, "c/0", Buffer.from_bytes(b"abcdef"))
        assert (await store.get("c/0", proto)).to_bytes() == b"abcdef"
        await store._store.delete("c/0")  # the source no longer has it ...
        assert (await store.get("c/0", proto)).to_bytes() == b"abcdef"  # ... the cache has
        assert worker_cache.counters.hits == 1 and worker_cache.counters.remote_reads == 1


class TestOverMemoryStore(_OnWorkerOverAnySource):
    """StoreTests through a worker's cache over a MemoryStore (stores over one dict agree)."""

    @pytest.fixture
    def store_dict(self) -> dict:
        return {}

    @pytest.fixture
    def store_kwargs(self, store_dict: dict) -> dict[str, object]:
        return {"store": MemoryStore(store_dict)}

    @pytest.fixture
    def open_kwargs(self, store_dict: dict) -> dict[str, object]:
        return {"store_cls": MemoryStore, "store_dict": store_dict}

    def test_store_supports_listing(self, store: ClusterCacheStore) -> None:
        assert store.supports_listing


@pytest.fixture
def s3_prefix(s3) -> str:
    import uuid

    return f"test/storetests-{uuid.uuid4().hex[:8]}"


class TestOverFsspecS3(_OnWorkerOverAnySource):
    """StoreTests through a worker's cache over FsspecStore (s3fs) on the loopback S3."""

    @pytest.fixture
    def store_kwargs(self, s3, s3_prefix) -> dict[str, object]:
        return {"store": FsspecStore(_s3fs(s3), path=s3_prefix)}

    @pytest.fixture
    def open_kwargs(self, s3, s3_prefix) -> dict[str, object]:
        return {"store_cls": FsspecStore, "fs": _s3fs(s3), "path": s3_prefix}

    def test_serializable_store(self, store: ClusterCacheStore) -> None:
        # An FsspecStore over s3fs is not equal to its own unpickled copy (a new s3fs
        # instance): the identity is what must survive.
        clone = pickle.loads(pickle.dumps(store))
        assert clone.location == store.location and clone._store.path == store._store.path


def _s3fs(s3):
    import s3fs

    return s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, **s3.storage_options)


class TestOverObjectStoreS3(_OnWorkerOverAnySource):
    """StoreTests through a worker's cache over zarr's ObjectStore (obstore's S3Store)."""

    @pytest.fixture
    def store_kwargs(self, s3, s3_prefix) -> dict[str, object]:
        from zarr.storage import ObjectStore

        return {"store": ObjectStore(_obstore_s3(s3, s3_prefix))}

    @pytest.fixture
    def open_kwargs(self, s3, s3_prefix) -> dict[str, object]:
        from zarr.storage import ObjectStore

        return {"store_cls": ObjectStore, "store": _obstore_s3(s3, s3_prefix)}


def _obstore_s3(s3, prefix):
    pytest.importorskip("obstore")
    return obstore_s3(s3, prefix)


def _not_for_this_source(test):
    @functools.wraps(test)
    def skipped(*args, **kwargs):
        pytest.skip(
            "the source has no synchronous API (zarr skips these tests for it), and its "
            "s3 sessions belong to one event loop; the sync API through the cache is "
            "tested over LocalStore and MemoryStore"
        )

    return skipped


for _name, _test in vars(StoreTests).items():
    if _name.startswith("test_") and "sync" in _name:
        setattr(TestOverMemoryStore, _name, _in_a_thread(_test))
        for _cls in (TestOverFsspecS3, TestOverObjectStoreS3):
            setattr(_cls, _name, _not_for_this_source(_test))


class _RecordingBuffer(Buffer):
    """A CPU buffer that counts its builds: what a GPU prototype's buffer stands for here."""

    built = 0

    @classmethod
    def from_bytes(cls, bytes_like):
        cls.built += 1
        return super().from_bytes(bytes_like)


RECORDING = BufferPrototype(buffer=_RecordingBuffer, nd_buffer=NDBuffer)


@pytest.fixture
async def two_worker_caches(tmp_path, monkeypatch):
    """Two real workers' caches in this test's loop; ``current["cache"]`` is the reader's."""
    from distributed import Client, Scheduler, Worker

    from dask_zarr_cache import ZarrCachePlugin

    async with (
        Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler,
        Worker(scheduler.address, host="127.0.0.1", nthreads=1) as a,
        Worker(scheduler.address, host="127.0.0.1", nthreads=1) as b,
        Client(scheduler.address, asynchronous=True) as client,
    ):
        await client.register_plugin(ZarrCachePlugin(max_size="10MiB", directory=tmp_path / "c"))
        caches = [a.extensions["zarr_cache"], b.extensions["zarr_cache"]]
        current = {"cache": caches[0]}
        monkeypatch.setattr("dask_zarr_cache.store.worker_cache", lambda: current["cache"])
        yield caches, current


async def test_every_read_path_returns_the_buffer_the_prototype_asks_for(
    tmp_path, two_worker_caches
):
    # zarr with enable_gpu() passes a GPU prototype; whichever way the bytes come (the
    # source, this worker's disk, a peer, a kept write, a byte range), the reader gets
    # the prototype's buffer, built from the bytes.
    (a, b), current = two_worker_caches
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "c0").write_bytes(b"chunk zero")
    shard = bytes(range(256)) * 100
    (tmp_path / "src" / "shard").write_bytes(shard)
    store = ClusterCacheStore(LocalStore(tmp_path / "src"))

    async def read(key, byte_range=None):
        before = _RecordingBuffer.built
        buf = await store.get(key, RECORDING, byte_range)
        assert type(buf) is _RecordingBuffer and _RecordingBuffer.built > before
        return buf.to_bytes()

    assert await read("c0") == b"chunk zero"  # from the source
    assert a.counters.remote_reads == 1
    assert await read("c0") == b"chunk zero"  # from this worker's disk
    assert a.counters.hits == 1
    await a.idle()  # its commit reached the index
    current["cache"] = b
    assert await read("c0") == b"chunk zero"  # from the peer
    assert b.counters.peer_reads == 1 and b.counters.remote_reads == 0
    current["cache"] = a
    for _ in range(2):  # a range of an object: from the source, then from disk
        assert await read("shard", RangeByteRequest(10, 20)) == shard[10:20]
    assert a.counters.remote_reads == 2 and a.counters.hits == 2


def _write_then_read_back(store: ClusterCacheStore, key: str) -> tuple[str, bytes, int]:
    """In a task: write ``key``, then read it with RECORDING; the buffer type, bytes, GETs."""
    from distributed import get_worker
    from zarr.core.sync import sync

    worker = get_worker()
    cache = worker.extensions["zarr_cache"]
    sync(store.set(key, Buffer.from_bytes(b"written")))
    asyncio.run_coroutine_threadsafe(cache.idle(), worker.loop.asyncio_loop).result()
    reads = cache.counters.remote_reads
    buf = sync(store.get(key, RECORDING))
    return type(buf).__name__, buf.to_bytes(), cache.counters.remote_reads - reads


def test_a_kept_write_is_read_back_in_the_buffer_the_prototype_asks_for(tmp_path, client):
    (tmp_path / "src").mkdir()
    store = ClusterCacheStore(LocalStore(tmp_path / "src"))
    kind, data, source_reads = client.submit(_write_then_read_back, store, "c1").result()
    assert (kind, data, source_reads) == ("_RecordingBuffer", b"written", 0)
