"""The consistency model (docs/consistency.md) on real parts.

Multi-process clusters, moto's S3 server on loopback (GETs counted at the server), real
files, ``dask worker`` processes killed, frozen and restarted with the same name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask.array as da
import dask.config
import numpy as np
import pytest
import zarr
from distributed import Client
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats
from tests.conftest import (
    cache_cluster,
    cached,
    chunk_gets,
    dask_command,
    free_port,
    read_all,
    s3_store,
    write_array,
)
from tests.test_worker_faults import index_host, wait_for

V1 = np.arange(64 * 64, dtype="f8").reshape(64, 64)
V2 = V1 * 10 + 1


def workers_of(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def _read(store, path):
    return zarr.open_array(store, path=path, mode="r")[...]


def read_on(client, store, worker, path=None) -> np.ndarray:
    """Read the whole array in one task on ``worker`` (every chunk through its cache)."""
    return client.submit(_read, store, path, workers=[worker], pure=False).result()


def every_worker_sees(client, store, expected, path=None) -> None:
    for worker in workers_of(client):
        np.testing.assert_array_equal(read_on(client, store, worker, path), expected)


def warm(client, store) -> None:
    """Cache every chunk, spread over the workers, and read each on every worker once."""
    np.testing.assert_array_equal(read_all(store, client), V1)
    every_worker_sees(client, store, V1)


# -- read-your-writes, from wherever the write comes ---------------------------------------
def _write_in_task(store, value):
    zarr.open_array(store, mode="r+")[...] = value


def _write_from_thread_of_task(store, value):
    errors = []

    def run():
        try:
            zarr.open_array(store, mode="r+")[...] = value
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def _write_in_async_task(store, value):
    arr = await zarr.api.asynchronous.open_array(store=store, mode="r+")
    await arr.setitem(Ellipsis, value)


def _write_with_sync_store_api(store, value):
    # zarr's synchronous store API (``set_sync``, zarr >= 3.2 delegates it straight to the
    # source in WrapperStore): the chunks of ``value``, encoded as zarr would, one by one.
    arr = zarr.open_array(store, mode="r")
    scratch = zarr.storage.MemoryStore()
    like = zarr.create_array(scratch, shape=arr.shape, chunks=arr.chunks, dtype=arr.dtype)
    like[...] = value
    proto = zarr.core.buffer.default_buffer_prototype()
    for key in zarr.core.sync.sync(_keys(scratch)):
        if key.startswith("c/"):
            store.set_sync(key, zarr.core.sync.sync(scratch.get(key, proto)))


async def _keys(store):
    return [key async for key in store.list()]


def _write_from_second_client(store, value, address):
    script = textwrap.dedent(
        """
        import pickle, sys
        import zarr
        from distributed import Client
        store, value, address = pickle.loads(sys.stdin.buffer.read())
        with Client(address):
            zarr.open_array(store, mode="r+")[...] = value
        """
    )
    import pickle

    subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps((store, value, address)),
        check=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "origin",
    ["client", "task", "thread-of-task", "async-task", "second-client-process", "sync-api"],
)
def test_read_your_writes_cluster_wide(s3, s3_path, client, origin, tmp_path):
    if origin == "async-task":
        # s3fs sessions belong to zarr's loop and cannot run on the worker's loop (with or
        # without the cache), so the async task writes a local-disk source.
        source = LocalStore(tmp_path / "data.zarr")
        zarr.create_array(source, shape=V1.shape, chunks=(16, 16), dtype=V1.dtype)[...] = V1
    else:
        write_array(s3, s3_path, V1, chunks=(16, 16))
        source = s3_store(s3, s3_path)
    store = ClusterCacheStore(source)
    warm(client, store)
    first = workers_of(client)[0]
    if origin == "client":
        zarr.open_array(store, mode="r+")[...] = V2
    elif origin == "task":
        client.submit(_write_in_task, store, V2, workers=[first], pure=False).result()
    elif origin == "thread-of-task":
        client.submit(_write_from_thread_of_task, store, V2, workers=[first], pure=False).result()
    elif origin == "async-task":
        client.submit(_write_in_async_task, store, V2, workers=[first], pure=False).result()
    elif origin == "sync-api":
        client.submit(_write_with_sync_store_api, store, V2, workers=[first], pure=False).result()
    else:
        _write_from_second_client(store, V2, client.scheduler.address)
    every_worker_sees(client, store, V2)  # every read that starts after the write returned
    np.testing.assert_array_equal(read_all(store, client), V2)


async def _writes_kept(dask_worker):
    await dask_worker.extensions["zarr_cache"].idle()  # copies of written chunks are kept beside


@pytest.mark.parametrize("cache_writes", [True, False])
def test_reading_back_what_tasks_wrote_gets_nothing_when_writes_are_kept(s3, s3_path, cache_writes):
    write_array(s3, s3_path, np.zeros_like(V1), chunks=(16, 16))
    store = ClusterCacheStore(s3_store(s3, s3_path))
    with cache_cluster(2, cache_writes=cache_writes) as (_, client):
        target = zarr.open_array(store, mode="r+")
        da.from_array(V2, chunks=(16, 16)).to_zarr(target, compute=False).compute()
        client.run(_writes_kept)
        before = sum(chunk_gets(s3, s3_path).values())
        np.testing.assert_array_equal(read_all(store, client), V2)
        every_worker_sees(client, store, V2)
        gets = sum(chunk_gets(s3, s3_path).values()) - before
    assert gets == (0 if cache_writes else 16)  # 16 chunks: each read once, or not at all


async def _sync_api_read(store):
    return zarr.open_array(store, mode="r")[...].sum()


async def _sync_api_write(store):
    zarr.open_array(store, mode="r+")[...] = V2


def test_sync_api_in_an_async_task_works_and_never_hangs(s3, s3_path, client):
    write_array(s3, s3_path, V1, chunks=(16, 16))
    store = ClusterCacheStore(s3_store(s3, s3_path))
    warm(client, store)
    worker = workers_of(client)[0]
    start = time.monotonic()
    # The task blocks its worker's event loop while zarr runs: reads use the local files
    # or the source, a write reaches the scheduler over its own connection.
    total = client.submit(_sync_api_read, store, workers=[worker], pure=False).result(60)
    assert total == V1.sum()
    client.submit(_sync_api_write, store, workers=[worker], pure=False).result(60)
    assert time.monotonic() - start < 30
    every_worker_sees(client, store, V2)


# -- one object, one identity -----------------------------------------------------------
def test_stores_on_the_same_data_share_entries_and_invalidations(s3, s3_path, client):
    write_array(s3, s3_path, V1, chunks=(16, 16))
    group_root = ClusterCacheStore(s3_store(s3, s3_path.rsplit("/", 1)[0], read_only=True))
    reader = cached(s3, s3_path + "/")  # read-only, trailing slash
    other_creds = FsspecStore.from_url(
        f"s3://{s3_path}",
        storage_options={**s3.storage_options, "key": "other", "secret": "other"},
    )
    writer = ClusterCacheStore(other_creds)
    warm(client, reader)
    s3.reset_counts()
    name = s3_path.rsplit("/", 1)[1]
    arr_in_group = zarr.open_array(group_root, path=name, mode="r")
    x = client.compute(da.from_zarr(arr_in_group)).result()
    np.testing.assert_array_equal(x, V1)
    assert chunk_gets(s3, s3_path) == {}  # the group-rooted store found the same entries
    zarr.open_array(writer, mode="r+")[:16, :16] = -1  # one chunk, other credentials
    expected = V1.copy()
    expected[:16, :16] = -1
    every_worker_sees(client, reader, expected)
    every_worker_sees(client, group_root, expected, path=name)


def test_in_memory_sources_never_share_entries(client):
    seen = []
    for value in range(4):  # one after the other: Python may reuse the freed object's id
        source = MemoryStore()
        zarr.create_array(source, shape=(8,), chunks=(8,), dtype="i4", fill_value=0)[...] = value
        store = ClusterCacheStore(source)
        seen.append(
            float(client.compute(da.from_zarr(zarr.open_array(store, mode="r")).sum()).result())
        )
        del source, store
    assert seen == [0.0, 8.0, 16.0, 24.0]


# -- restarts, partitions and dead peers ------------------------------------------------
class WorkerProcesses:
    """A ``dask scheduler`` and named ``dask worker`` processes (no nanny) on loopback."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Tasks defined in this module unpickle in the workers: they need the checkout.
        self.env = {**os.environ, "PYTHONPATH": root, **(env or {})}
        self.workers: dict[str, subprocess.Popen] = {}
        self.scheduler = self._spawn(
            dask_command("scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                         "--dashboard-address", f"127.0.0.1:{free_port()}")
        )  # fmt: skip

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(
            dask_command("worker", self.address, "--name", name, "--nthreads", "2",
                         "--no-nanny", "--host", "127.0.0.1", "--dashboard-address", ":0")
        )  # fmt: skip

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.kill()
        proc.wait(30)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            proc.kill()
            proc.wait(30)


def _name_of(client, address):
    return client.scheduler_info()["workers"][address]["name"]


def _synced(dask_worker) -> bool:
    cache = dask_worker.extensions.get("zarr_cache")
    return cache is not None and cache.state.can_serve()


def _keys_held(dask_worker):
    return sorted(dask_worker.extensions["zarr_cache"].state.entries)


def _chunk_of(key: str, s3_path: str) -> tuple[slice, slice]:
    i, j = (int(n) for n in key.split("\x00")[1][len(s3_path) + 1 :].split("/")[1:])
    return slice(16 * i, 16 * (i + 1)), slice(16 * j, 16 * (j + 1))


def test_a_worker_down_during_a_write_never_serves_what_it_replaced(s3, s3_path, tmp_path):
    """Killed (with the index on it, so the index is re-created), written, restarted with
    the same name and persistent directory: it drops exactly the replaced file."""
    write_array(s3, s3_path, V1, chunks=(16, 16), compressors=None)
    procs = WorkerProcesses()
    try:
        for name in ("w0", "w1", "w2"):
            procs.start_worker(name)
        with Client(procs.address, timeout=60) as client:
            client.wait_for_workers(3, timeout=60)
            client.register_plugin(ZarrCachePlugin(max_size="1GiB", directory=tmp_path / "c"))
            wait_for(lambda: all(client.run(_synced).values()), timeout=30)
            store = cached(s3, s3_path)
            warm(client, store)
            victim = client.run_on_scheduler(index_host)
            held = client.run(_keys_held, workers=[victim])[victim]
            assert len(held) >= 2
            name = _name_of(client, victim)
            procs.kill_worker(name)
            wait_for(lambda: victim not in client.scheduler_info()["workers"])
            rows, cols = _chunk_of(held[0], s3_path)
            writer = ClusterCacheStore(s3_store(s3, s3_path))
            zarr.open_array(writer, mode="r+")[rows, cols] = -7.0  # while it is away
            expected = V1.copy()
            expected[rows, cols] = -7.0
            procs.start_worker(name)
            client.wait_for_workers(3, timeout=60)
            wait_for(lambda: all(client.run(_synced).values()), timeout=30)
            back = next(a for a in workers_of(client) if _name_of(client, a) == name)
            assert sorted(client.run(_keys_held, workers=[back])[back]) == held[1:]
            s3.reset_counts()
            np.testing.assert_array_equal(read_on(client, store, back), expected)
            every_worker_sees(client, store, expected)
            replaced = held[0].split("\x00")[1]
            assert chunk_gets(s3, s3_path) == {replaced: 1}  # the rest came from disks
    finally:
        procs.close()


def test_files_from_a_previous_cluster_are_never_served(s3, s3_path, tmp_path):
    """A new scheduler cannot vouch for files written under another: they are dropped."""
    write_array(s3, s3_path, V1, chunks=(16, 16))
    for round_, expected in enumerate((V1, V2)):
        procs = WorkerProcesses()
        try:
            procs.start_worker("only")
            with Client(procs.address, timeout=60) as client:
                client.wait_for_workers(1, timeout=60)
                client.register_plugin(ZarrCachePlugin(directory=tmp_path / "c"))
                wait_for(lambda: all(client.run(_synced).values()), timeout=30)
                np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), expected)
                if round_ == 0:
                    assert cluster_stats(client)["total"]["entries"] == 16
        finally:
            procs.close()
        # Between the clusters, the data changes without any cache knowing.
        zarr.open_array(s3_store(s3, s3_path), mode="r+")[...] = V2


def _pid(dask_worker=None) -> int:
    return os.getpid()


def _timed_chunk_reads(store, keys, s3_path):
    arr = zarr.open_array(store, mode="r")
    durations = []
    for key in keys:
        rows, cols = _chunk_of(key, s3_path)
        start = time.monotonic()
        arr[rows, cols]
        durations.append(time.monotonic() - start)
    return durations


def test_a_frozen_peer_costs_one_timeout_and_a_write_still_returns(s3, s3_path):
    """A worker that stops answering (SIGSTOP: alive, connected, silent)."""
    write_array(s3, s3_path, V1, chunks=(16, 16))
    config = {"distributed.comm.timeouts.connect": "3s", "zarr-cache.write-lease": "3s"}
    with dask.config.set(config), cache_cluster(n_workers=3) as (_cluster, client):
        store = cached(s3, s3_path)
        warm(client, store)
        index = client.run_on_scheduler(index_host)
        held = client.run(_keys_held)
        frozen = next(a for a in workers_of(client) if a != index and len(held[a]) >= 2)
        reader = next(a for a in workers_of(client) if a not in (index, frozen))
        pid = client.run(_pid, workers=[frozen])[frozen]
        os.kill(pid, signal.SIGSTOP)
        try:
            # Later reads of its chunks pay one timeout at most, not one each.
            durations = client.submit(
                _timed_chunk_reads, store, held[frozen], s3_path, workers=[reader], pure=False
            ).result(60)
            assert sum(durations) < 3 * 3.0, durations
            assert sorted(durations)[-2] < 1.0, durations
            # A write it cannot confirm returns once its lease has run out.
            rows, cols = _chunk_of(held[frozen][0], s3_path)
            start = time.monotonic()
            zarr.open_array(ClusterCacheStore(s3_store(s3, s3_path)), mode="r+")[rows, cols] = -3
            assert time.monotonic() - start < 20
        finally:
            os.kill(pid, signal.SIGCONT)
        expected = V1.copy()
        expected[rows, cols] = -3
        # Thawed, it never serves the replaced bytes: it catches up before serving.
        np.testing.assert_array_equal(read_on(client, store, frozen), expected)
        every_worker_sees(client, store, expected)


def test_reregistering_while_reading_leaves_disk_and_index_in_step(s3, s3_path):
    data = np.random.default_rng(5).random((128, 128))
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)  # 64 x 2 KiB
    with cache_cluster(n_workers=2, max_size=200 * 2048) as (_cluster, client):
        store = cached(s3, s3_path)
        futures = [
            client.compute(da.from_zarr(zarr.open_array(store, mode="r"), name=f"r{i}").sum())
            for i in range(6)
        ]
        time.sleep(0.3)
        client.register_plugin(ZarrCachePlugin(max_size=20 * 2048))  # while they run
        for future in futures:
            assert future.result() == pytest.approx(data.sum())
        time.sleep(1.0)  # a flush: evictions for the new budget
        files = client.run(_files_on_disk)
        entries = client.run(_keys_held)
        assert all(sorted(files[a]) == entries[a] for a in files), (files, entries)
        assert all(sum(files[a].values()) <= 20 * 2048 for a in files)
        # The index learns of every copy dropped by the next flush.
        wait_for(
            lambda: (
                {a: cluster_stats(client)["index"]["workers"][a]["entries"] for a in files}
                == {a: len(f) for a, f in files.items()}
            ),
            timeout=10,
        )


def _files_on_disk(dask_worker):
    return {f.key: f.size for f in dask_worker.extensions["zarr_cache"].disk.scan()}


# -- every legal key, and the cache's own folders ------------------------------------------
ODD_KEYS = [
    "",  # the root itself
    "a",
    "a/b",  # "a" is both an object and a prefix
    ".hidden/.tmp-1",
    "..a/b../...",
    "ünïcödé/ключ/鍵",
    "tab\there/new\nline",
    "back\\slash#hash%percent",
    "x" * 300,  # one component over 255 bytes
    "/".join(["d" * 200] * 21),  # over 4 KiB in all (S3 refuses keys over 1 KiB)
]


def _outcome(coro_fn):
    try:
        value = zarr.core.sync.sync(coro_fn())
    except Exception as err:
        return "error", type(err).__name__
    return "ok", None if value is None else value.to_bytes()


def _key_outcomes(store, keys):
    """What set, get (twice: source then cache), delete, get does for each key."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import Buffer

    proto = default_buffer_prototype()
    out = {}
    for i, key in enumerate(keys):
        value = Buffer.from_bytes(f"value {i} of {key[:20]!r}".encode())
        steps = [
            _outcome(lambda: store.set(key, value)),  # noqa: B023
            _outcome(lambda: store.get(key, proto)),  # noqa: B023
            _outcome(lambda: store.get(key, proto)),  # noqa: B023
            _outcome(lambda: store.delete(key)),  # noqa: B023
            _outcome(lambda: store.get(key, proto)),  # noqa: B023
        ]
        out[key] = steps
    return out


@pytest.mark.parametrize("source_kind", ["s3", "memory"])
def test_every_legal_key_works_as_through_the_source(s3, s3_path, client, source_kind):
    def source(suffix):
        if source_kind == "memory":
            return MemoryStore()
        return s3_store(s3, f"{s3_path}-{suffix}")

    expected = _key_outcomes(source("plain"), ODD_KEYS)
    assert expected["a/b"][2] == ("ok", expected["a/b"][1][1])  # the keys really work
    cached_outside = ClusterCacheStore(source("client"))
    assert _key_outcomes(cached_outside, ODD_KEYS) == expected
    in_task = ClusterCacheStore(source("task"))
    worker = workers_of(client)[0]
    got = client.submit(_key_outcomes, in_task, ODD_KEYS, workers=[worker], pure=False).result()
    assert got == expected
    if source_kind == "s3":
        stats = cluster_stats(client)["workers"][worker]
        assert stats["hits"] > 0  # the second get came from the cache


def test_pointing_directory_at_a_data_folder_loses_nothing(s3, s3_path, tmp_path):
    from dask_zarr_cache.core.config import CacheSettings, worker_directory

    data = tmp_path / "my-data"
    data.mkdir()
    (data / "results.nc").write_bytes(b"precious")
    # A folder that happens to sit where worker 0's cache would go, with someone's files.
    settings = CacheSettings.from_arguments(directory=data)
    taken = data / os.path.basename(worker_directory(settings, 0, ""))
    taken.mkdir()
    (taken / "notes.txt").write_text("also precious")
    write_array(s3, s3_path, V1, chunks=(16, 16))
    with cache_cluster(n_workers=2, directory=data) as (_cluster, client):
        store = cached(s3, s3_path)
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), V1)
        stats = cluster_stats(client)["workers"]
        names = {a: _name_of(client, a) for a in stats}
        refused = next(a for a, n in names.items() if n == 0)
        assert stats[refused]["caching_disabled"] == 1 and stats[refused]["entries"] == 0
        assert sum(s["entries"] for s in stats.values()) > 0  # the other worker caches
    assert (data / "results.nc").read_bytes() == b"precious"
    assert (taken / "notes.txt").read_text() == "also precious"
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
