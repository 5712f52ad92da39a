"""Store identity: one object, one cache key, whatever store (or store class) names it.

Pure tests of the naming first (no cluster, no network); then, on a real process cluster
over the loopback S3 server with GETs counted at the server, each kind of store: reads
are right, one GET per chunk, writes through one store drop what another store over the
same objects cached.
"""

from __future__ import annotations

import gc
import json
import pickle
import zipfile

import numpy as np
import pytest
import zarr
from packaging.version import Version
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, MemoryStore, ObjectStore, ZipStore

from dask_zarr_cache import CacheConfigError, ClusterCacheStore
from dask_zarr_cache.identity.keys import is_immutable
from dask_zarr_cache.identity.stores import (
    ReadThrough,
    ReferenceTargets,
    SourceLocation,
    source_identity,
)
from tests.conftest import (
    chunk_gets,
    icechunk_s3_storage,
    obstore_s3,
    read_all,
    s3_store,
    write_array,
)

obstore = pytest.importorskip("obstore")
from obstore.store import S3Store  # noqa: E402

ENDPOINT = "http://127.0.0.1:1"


def key_of(store, key, byte_range=None):
    return source_identity(store).read_key(store, key, byte_range)


def fsspec_s3(path, endpoint=ENDPOINT, **options):
    base = {"endpoint_url": endpoint, "key": "k", "secret": "s", "skip_instance_cache": True}
    return FsspecStore.from_url(f"s3://{path}", storage_options={**base, **options})


def offline_obstore(bucket, prefix, endpoint=ENDPOINT, **options):
    store = S3Store(
        bucket,
        prefix=prefix,
        endpoint=endpoint,
        region="us-east-1",
        client_options={"allow_http": True},
        **{"access_key_id": "k", "secret_access_key": "s", **options},
    )
    return ObjectStore(store, read_only=True)


# -- object stores ------------------------------------------------------------------------
def test_one_object_one_key_whatever_the_fsspec_store_object():
    reference = key_of(fsspec_s3("bkt/data.zarr"), "arr/c/0")
    assert key_of(fsspec_s3("bkt/data.zarr", key="other", secret="creds"), "arr/c/0") == reference
    assert key_of(fsspec_s3("bkt/data.zarr/"), "arr/c/0") == reference  # trailing slash
    assert key_of(fsspec_s3("bkt/data.zarr/arr"), "c/0") == reference  # rooted at the array
    read_only = FsspecStore.from_url(
        "s3://bkt/data.zarr",
        read_only=True,
        storage_options={"endpoint_url": ENDPOINT + "/", "anon": True},
    )
    assert key_of(read_only, "arr/c/0") == reference
    # Another endpoint or another bucket is other data.
    assert key_of(fsspec_s3("bkt/data.zarr", endpoint="http://127.0.0.1:2"), "arr/c/0") != reference
    assert key_of(fsspec_s3("other/data.zarr"), "arr/c/0") != reference


def test_object_store_over_s3_names_objects_as_fsspec_does():
    reference = key_of(fsspec_s3("bkt/data.zarr"), "arr/c/0")
    assert key_of(offline_obstore("bkt", "data.zarr"), "arr/c/0") == reference
    assert key_of(offline_obstore("bkt", "data.zarr/arr"), "c/0") == reference
    other_creds = offline_obstore("bkt", "data.zarr", access_key_id="x", secret_access_key="y")
    assert key_of(other_creds, "arr/c/0") == reference  # credentials are not identity
    elsewhere = offline_obstore("bkt", "data.zarr", endpoint="http://127.0.0.1:2")
    assert key_of(elsewhere, "arr/c/0") != reference
    assert key_of(offline_obstore("other", "data.zarr"), "arr/c/0") != reference
    # Every AWS endpoint (and none) is AWS.
    aws = key_of(FsspecStore.from_url("s3://bkt/d", storage_options={"anon": True}), "k")
    regional = S3Store.from_url("https://bkt.s3.us-west-2.amazonaws.com/d", skip_signature=True)
    assert key_of(ObjectStore(regional, read_only=True), "k") == aws
    assert key_of(ObjectStore(S3Store("bkt", prefix="d", skip_signature=True)), "k") == aws


def test_object_store_endpoint_from_the_environment(monkeypatch):
    # obstore reads AWS_ENDPOINT_URL itself and does not show it in its config.
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    store = ObjectStore(S3Store("bkt", prefix="data.zarr", skip_signature=True), read_only=True)
    assert key_of(store, "arr/c/0") == key_of(fsspec_s3("bkt/data.zarr"), "arr/c/0")


def test_local_paths_are_canonical(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    one = source_identity(LocalStore(tmp_path / "d"))
    assert source_identity(LocalStore(str(tmp_path / "d") + "/")) == one
    assert source_identity(LocalStore(tmp_path / "link")) == one
    assert key_of(LocalStore(tmp_path), "d/x") == one.read_key(None, "x")
    assert source_identity(FsspecStore.from_url(f"file://{tmp_path}/d")) == one
    local = obstore.store.LocalStore(tmp_path / "link")
    assert source_identity(ObjectStore(local)) == one


def test_http_stores_name_objects_by_url():
    fsspec_http = FsspecStore.from_url("https://example.com/data.zarr")
    obstore_http = ObjectStore(obstore.store.HTTPStore.from_url("https://example.com/data.zarr"))
    assert key_of(fsspec_http, "c/0") == key_of(obstore_http, "c/0")


def test_gcs_and_azure_buckets_are_named_by_bucket_and_path():
    gcs = obstore.store.GCSStore("bkt", prefix="d", skip_signature=True)
    same = obstore.store.GCSStore.from_url("gs://bkt/d", skip_signature=True)
    assert key_of(ObjectStore(gcs), "k") == key_of(ObjectStore(same), "k")
    assert key_of(ObjectStore(gcs), "k") != key_of(fsspec_s3("bkt/d"), "k")
    azure = obstore.store.AzureStore("cont", prefix="d", account_name="acct", skip_signature=True)
    other = obstore.store.AzureStore("cont", prefix="d", account_name="other", skip_signature=True)
    assert key_of(ObjectStore(azure), "k") != key_of(ObjectStore(other), "k")


def test_zip_stores_are_named_by_their_file(tmp_path):
    one = source_identity(ZipStore(tmp_path / "a.zip", mode="w"))
    assert one == source_identity(ZipStore(tmp_path / "a.zip", mode="w"))
    assert one != source_identity(ZipStore(tmp_path / "b.zip", mode="w"))


@pytest.mark.skipif(
    Version(zarr.__version__) < Version("3.4"), reason="zarr < 3.4 opens zip stores by path only"
)
def test_zip_store_over_an_open_file_reads_through(tmp_path):
    zipfile.ZipFile(tmp_path / "a.zip", "w").close()
    with open(tmp_path / "a.zip", "rb") as f:
        assert isinstance(source_identity(ZipStore(f, mode="r")), ReadThrough)


# -- in-memory stores ---------------------------------------------------------------------
def test_memory_stores_over_one_dict_share_an_identity_and_other_dicts_never():
    shared: dict = {}
    one, two = MemoryStore(shared), MemoryStore(shared)
    assert source_identity(one) == source_identity(two)
    assert source_identity(one.with_read_only(True)) == source_identity(one)
    assert ClusterCacheStore(one) == ClusterCacheStore(two)  # zarr's test_store_eq
    seen = set()
    for _ in range(50):  # Python reuses ids of freed objects; identities are never reused
        store = MemoryStore({})
        seen.add(source_identity(store).namespace)
        del store
        gc.collect()
    assert len(seen) == 50 and source_identity(one).namespace not in seen
    assert ClusterCacheStore(MemoryStore({})) != ClusterCacheStore(MemoryStore({}))


def test_a_gpu_memory_store_is_named_by_the_dict_that_holds_it():
    # GpuMemoryStore (zarr.config.enable_gpu()) is a MemoryStore whose values are device
    # buffers: the same dict is the same objects, as for MemoryStore.
    from zarr.storage import GpuMemoryStore

    shared: dict = {}
    gpu = GpuMemoryStore(shared)
    assert source_identity(gpu) == source_identity(MemoryStore(shared))
    assert source_identity(gpu) != source_identity(GpuMemoryStore({}))


def test_object_stores_over_one_obstore_memory_store_share_an_identity():
    memory = obstore.store.MemoryStore()
    assert source_identity(ObjectStore(memory)) == source_identity(ObjectStore(memory))
    assert source_identity(ObjectStore(memory)) != source_identity(
        ObjectStore(obstore.store.MemoryStore())
    )


# -- snapshots ----------------------------------------------------------------------------
@pytest.fixture
def icechunk_repo(tmp_path):
    icechunk = pytest.importorskip("icechunk")
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "repo")))
    snapshots = []
    for value in (1, 2):
        session = repo.writable_session("main")
        arr = zarr.open_array(
            session.store, path="a", mode="a", shape=(8,), chunks=(4,), dtype="i8"
        )
        arr[:] = value
        snapshots.append(session.commit(f"value {value}"))
    return repo, snapshots


def test_icechunk_snapshots_are_named_by_their_id_and_never_expire(icechunk_repo):
    repo, (first, second) = icechunk_repo
    one = repo.readonly_session(snapshot_id=first).store
    again = repo.readonly_session(snapshot_id=first).store
    other = repo.readonly_session(snapshot_id=second).store
    assert key_of(one, "a/c/0") == key_of(again, "a/c/0")
    assert key_of(one, "a/c/0") != key_of(other, "a/c/0")  # same key, another snapshot
    assert is_immutable(key_of(one, "a/c/0"))
    branch = repo.readonly_session(branch="main").store  # pinned to the tip when opened
    assert key_of(branch, "a/c/0") == key_of(other, "a/c/0")
    pickled = pickle.loads(pickle.dumps(ClusterCacheStore(one)))
    assert pickled.cache_key("a/c/0") == key_of(one, "a/c/0")


def test_icechunk_writable_sessions_read_through_and_namespaces_are_refused(icechunk_repo):
    repo, _ = icechunk_repo
    writable = repo.writable_session("main").store
    assert isinstance(source_identity(writable), ReadThrough)
    assert ClusterCacheStore(writable).cache_key("a/c/0") is None
    first = repo.readonly_session(snapshot_id=repo.lookup_snapshot(repo.lookup_branch("main")).id)
    with pytest.raises(CacheConfigError, match="snapshot"):
        ClusterCacheStore(first.store, namespace="s3://bucket/repo")


# -- references ---------------------------------------------------------------------------
def kerchunk_store(refs, **remote_options):
    from fsspec.implementations.reference import ReferenceFileSystem

    options = {"key": "k", "secret": "s", "endpoint_url": ENDPOINT, **remote_options}
    fs = ReferenceFileSystem(
        {"version": 1, "refs": refs},
        remote_protocol="s3",
        remote_options={**options, "asynchronous": True},
        asynchronous=True,
    )
    return FsspecStore(fs, read_only=True)


REFS = {
    ".zgroup": '{"zarr_format": 2}',
    "a/0": ["s3://bkt/file.bin", 0, 100],
    "a/1": ["s3://bkt/file.bin", 100, 100],
    "a/2": "base64:AAECAw==",
    "w": ["s3://bkt/whole.bin"],
}


def test_kerchunk_chunks_are_named_by_the_file_range_they_point_to():
    store = kerchunk_store(REFS)
    assert isinstance(source_identity(store), ReferenceTargets)
    file_key = key_of(fsspec_s3("bkt"), "file.bin", RangeByteRequest(100, 200))
    assert key_of(store, "a/1") == file_key
    assert key_of(store, "a/1", RangeByteRequest(2, 6)) == key_of(
        fsspec_s3("bkt"), "file.bin", RangeByteRequest(102, 106)
    )
    assert key_of(store, "a/1", OffsetByteRequest(90)) == key_of(
        fsspec_s3("bkt"), "file.bin", RangeByteRequest(190, 200)
    )
    assert key_of(store, "a/1", SuffixByteRequest(4)) == key_of(
        fsspec_s3("bkt"), "file.bin", RangeByteRequest(196, 200)
    )
    assert key_of(store, "a/1", RangeByteRequest(0, 101)) is None  # past the chunk's end
    assert key_of(store, "w") == key_of(fsspec_s3("bkt"), "whole.bin")
    assert key_of(store, ".zgroup") is None and key_of(store, "a/2") is None  # inlined
    # Credentials are not identity; another file is another object.
    assert key_of(kerchunk_store(REFS, key="x", secret="y"), "a/1") == file_key
    moved = {**REFS, "a/1": ["s3://bkt/other.bin", 100, 100]}
    assert key_of(kerchunk_store(moved), "a/1") != file_key


def manifest_store(path="s3://bkt/file.bin", endpoint=ENDPOINT):
    pytest.importorskip("virtualizarr")
    from obspec_utils.registry import ObjectStoreRegistry
    from virtualizarr.manifests import ChunkManifest, ManifestArray, ManifestGroup, ManifestStore
    from virtualizarr.manifests.utils import create_v3_array_metadata

    manifest = ChunkManifest(
        {
            "0.0": {"path": path, "offset": 0, "length": 100},
            "0.1": {"path": path, "offset": 100, "length": 100},
        }
    )
    meta = create_v3_array_metadata(
        shape=(10, 20), data_type=np.dtype("u1"), chunk_shape=(10, 10), codecs=[{"name": "bytes"}]
    )
    group = ManifestGroup(arrays={"arr": ManifestArray(metadata=meta, chunkmanifest=manifest)})
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    s3 = S3Store(
        bucket,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        client_options={"allow_http": True},
    )
    return ManifestStore(group, registry=ObjectStoreRegistry({f"s3://{bucket}": s3}))


def test_virtual_chunks_are_named_by_the_file_range_they_point_to():
    store = manifest_store()
    assert isinstance(source_identity(store), ReferenceTargets)
    assert key_of(store, "arr/c/0/1") == key_of(
        fsspec_s3("bkt"), "file.bin", RangeByteRequest(100, 200)
    )
    assert key_of(store, "arr/c/0/1") == key_of(
        offline_obstore("bkt", ""), "file.bin", RangeByteRequest(100, 200)
    )
    assert key_of(store, "arr/zarr.json") is None and key_of(store, "zarr.json") is None
    assert key_of(manifest_store(), "arr/c/0/0") == key_of(store, "arr/c/0/0")  # shared
    assert key_of(manifest_store("s3://bkt/other.bin"), "arr/c/0/0") != key_of(store, "arr/c/0/0")
    assert key_of(manifest_store(endpoint="http://127.0.0.1:2"), "arr/c/0/0") != key_of(
        store, "arr/c/0/0"
    )


# -- what needs a namespace ---------------------------------------------------------------
def test_a_source_of_unknown_identity_needs_a_namespace_and_is_told_what_it_promises():
    from zarr.abc.store import Store

    class Mystery(MemoryStore):
        pass

    stubs = dict.fromkeys(Store.__abstractmethods__)
    unknown = type("Unknown", (Store,), stubs).__new__(type("Unknown", (Store,), stubs))
    with pytest.raises(CacheConfigError, match="namespace=") as refused:
        ClusterCacheStore(unknown)
    assert "does not change" in str(refused.value) and "version" in str(refused.value)
    assert ClusterCacheStore(Mystery(), namespace="era5#v2").namespace == "era5#v2"


def test_a_wrapper_over_a_store_the_cache_cannot_name_reads_through():
    from zarr.storage import WrapperStore

    store = WrapperStore(kerchunk_store(REFS))
    assert isinstance(source_identity(store), ReadThrough)
    assert isinstance(source_identity(WrapperStore(LocalStore("/tmp"))), SourceLocation)


def test_identities_pickle_small():
    store = ClusterCacheStore(offline_obstore("bkt", "data.zarr"))
    assert len(pickle.dumps(store.location)) < 200
    assert json.loads(json.dumps(store.cache_key("c/0"))) == store.cache_key("c/0")


# -- on a real cluster, GETs counted at the S3 server --------------------------------------
def server_obstore(s3, path, read_only=True):
    return ObjectStore(obstore_s3(s3, path), read_only=read_only)


def test_object_store_reads_once_and_shares_invalidations_with_fsspec(s3, s3_path, client):
    v1 = np.arange(32 * 32, dtype="f8").reshape(32, 32)
    write_array(s3, s3_path, v1, chunks=(8, 8))
    s3.reset_counts()
    by_obstore = ClusterCacheStore(server_obstore(s3, s3_path))
    for _ in range(3):
        np.testing.assert_array_equal(read_all(by_obstore, client), v1)
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 16 and set(gets.values()) == {1}  # 1 GET per chunk, no config
    # A write through FsspecStore drops what ObjectStore reads cached, and the other way.
    by_fsspec = ClusterCacheStore(s3_store(s3, s3_path))
    zarr.open_array(by_fsspec, mode="r+")[...] = v1 + 1
    np.testing.assert_array_equal(read_all(by_obstore, client), v1 + 1)
    zarr.open_array(ClusterCacheStore(server_obstore(s3, s3_path, False)), mode="r+")[...] = v1 + 2
    np.testing.assert_array_equal(read_all(by_fsspec, client), v1 + 2)
    np.testing.assert_array_equal(read_all(by_obstore, client), v1 + 2)


async def test_a_write_through_one_memory_store_is_seen_through_another(worker_cache):
    shared: dict = {}
    proto = zarr.core.buffer.default_buffer_prototype()
    one, two = ClusterCacheStore(MemoryStore(shared)), ClusterCacheStore(MemoryStore(shared))
    await one.set("k", proto.buffer.from_bytes(b"old"))
    assert (await one.get("k", proto)).to_bytes() == b"old"
    assert (await one.get("k", proto)).to_bytes() == b"old" and worker_cache.counters.hits == 1
    await two.set("k", proto.buffer.from_bytes(b"new"))
    assert (await one.get("k", proto)).to_bytes() == b"new"


def _read_path(store, path):
    import dask.array as da

    return da.from_zarr(zarr.open_array(store, path=path, mode="r"))


def test_icechunk_snapshots_are_read_once_each_and_never_mixed(s3, s3_path, client):
    icechunk = pytest.importorskip("icechunk")
    storage = icechunk_s3_storage(s3, s3_path)
    repo = icechunk.Repository.create(storage)
    rng = np.random.default_rng(7)
    versions = [rng.random((32, 32)), rng.random((32, 32))]  # incompressible: not inlined
    snapshots = []
    for data in versions:
        session = repo.writable_session("main")
        arr = zarr.open_array(session.store, path="a", mode="a", shape=(32, 32), chunks=(16, 16))
        arr[...] = data
        snapshots.append(session.commit("next"))

    def chunk_object_gets():  # Icechunk's GETs carry a query string: count every GET
        chunks = f"{s3_path}/chunks/"
        return sum(n for (m, k), n in s3.requests.items() if m == "GET" and k.startswith(chunks))

    s3.reset_counts()
    for snapshot, data in [*zip(snapshots, versions, strict=True), (snapshots[0], versions[0])]:
        store = ClusterCacheStore(repo.readonly_session(snapshot_id=snapshot).store)
        for _ in range(2):
            np.testing.assert_array_equal(client.compute(_read_path(store, "a")).result(), data)
    assert chunk_object_gets() == 8  # 4 chunks in each snapshot, each read once; none again
    # A writable session beside them reads through: its changes never reach a snapshot's
    # entries, and the snapshots still read their own bytes.
    session = repo.writable_session("main")
    writable = ClusterCacheStore(session.store)
    zarr.open_array(writable, path="a", mode="r+")[...] = 0.5
    assert (zarr.open_array(writable, path="a", mode="r")[...] == 0.5).all()
    first = ClusterCacheStore(repo.readonly_session(snapshot_id=snapshots[0]).store)
    np.testing.assert_array_equal(client.compute(_read_path(first, "a")).result(), versions[0])


def _put(s3, path, data):
    fs = s3.filesystem()
    fs.pipe(path, data)


def test_references_are_read_once_and_shared_by_reference_sets_over_one_file(s3, s3_path, client):
    raw = np.arange(200, dtype="u1").tobytes()
    bucket = s3_path.split("/", 1)[0]
    file_path = f"{s3_path}/file.bin"
    _put(s3, file_path, raw)
    url = f"s3://{file_path}"
    from fsspec.implementations.reference import ReferenceFileSystem

    def references(**credentials):
        array = {
            "zarr_format": 2, "shape": [200], "chunks": [100], "dtype": "|u1",
            "compressor": None, "fill_value": 0, "filters": None, "order": "C",
        }  # fmt: skip
        refs = {
            ".zgroup": '{"zarr_format": 2}',
            "a/.zarray": json.dumps(array),
            "a/0": [url, 0, 100],
            "a/1": [url, 100, 100],
        }
        options = {
            "endpoint_url": s3.endpoint_url, "key": "testing", "secret": "testing",
            "asynchronous": True, **credentials,
        }  # fmt: skip
        fs = ReferenceFileSystem(
            {"version": 1, "refs": refs}, remote_protocol="s3", remote_options=options,
            asynchronous=True,
        )  # fmt: skip
        return ClusterCacheStore(FsspecStore(fs, read_only=True))

    s3.reset_counts()
    expected = np.frombuffer(raw, "u1")
    for store in (references(), references(profile="other-reader")):
        for _ in range(2):
            got = client.compute(_read_path(store, "a")).result()
            np.testing.assert_array_equal(got, expected)
    assert s3.object_gets[file_path] == 2  # one ranged GET per chunk, for both sets
    # The file written through a store on the bucket: the referenced ranges are dropped.
    fs_store = ClusterCacheStore(s3_store(s3, bucket))
    zarr.core.sync.sync(fs_store.set(file_path.split("/", 1)[1], _buffer(raw[::-1])))
    got = client.compute(_read_path(references(), "a")).result()
    np.testing.assert_array_equal(got, expected[::-1])


def _buffer(data):
    return zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(data)


def test_virtual_datasets_over_one_file_share_entries(s3, s3_path, client):
    pytest.importorskip("virtualizarr")
    raw = np.arange(200, dtype="u1").tobytes()
    file_path = f"{s3_path}/file.bin"
    _put(s3, file_path, raw)

    def as_array(data):
        chunks = np.frombuffer(data, "u1").reshape(2, 10, 10)
        return np.hstack(list(chunks))

    def virtual():
        return ClusterCacheStore(manifest_store(f"s3://{file_path}", endpoint=s3.endpoint_url))

    s3.reset_counts()
    for _ in range(2):
        for store in (virtual(), virtual()):  # two datasets over the same file
            got = client.compute(_read_path(store, "arr")).result()
            np.testing.assert_array_equal(got, as_array(raw))
    assert s3.object_gets[file_path] == 2  # one ranged GET per chunk for both datasets
    # The file written through a store on its bucket: the virtual chunks are dropped.
    bucket, key = file_path.split("/", 1)
    fs_store = ClusterCacheStore(s3_store(s3, bucket))
    zarr.core.sync.sync(fs_store.set(key, _buffer(raw[::-1])))
    got = client.compute(_read_path(virtual(), "arr")).result()
    np.testing.assert_array_equal(got, as_array(raw[::-1]))
