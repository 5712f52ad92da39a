"""Worker-side faults on real process clusters: a cache may go cold, never wrong.

One test per failure of the reliability issue; every GET count is taken at the S3 server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import wait
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype

from dask_zarr_cache import ClusterCacheStore, InvalidCacheKeyError, cluster_stats
from tests.conftest import cache_cluster, cached, chunk_gets, read_all, s3_store, write_array


def cache_keys(dask_worker) -> list[str]:
    return sorted(dask_worker.extensions["zarr_cache"].state.entries)


def index_host(dask_scheduler, shard: int = 0) -> str | None:
    location = dask_scheduler.extensions["zarr_cache"].shards.locations[shard]
    return None if location is None else location["address"]


async def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_worker(client, address) -> None:
    client.run(_sigkill_self, workers=[address], wait=False)


def wait_for(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)


def slow_identity(block):
    time.sleep(0.15)
    return block


def test_owner_killed_mid_computation_costs_at_most_one_more_read(s3, s3_path):
    data = np.random.default_rng(10).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster() as (_cluster, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), data)
        host = client.run_on_scheduler(index_host)
        owners = client.run(cache_keys)
        victim = next(a for a in sorted(owners) if a != host and owners[a])
        victim_chunks = {k.split("\x00")[1][len(s3_path) + 1 :] for k in owners[victim]}

        x = da.from_zarr(zarr.open_array(store, mode="r")).map_blocks(slow_identity)
        future = client.compute(x.sum())
        time.sleep(0.4)
        kill_worker(client, victim)
        assert future.result() == pytest.approx(data.sum())
        wait_for(lambda: victim not in client.scheduler_info()["workers"])
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)

        gets = chunk_gets(s3, s3_path)
        for key, n in gets.items():
            chunk = key[len(s3_path) + 1 :]
            assert n <= (2 if chunk in victim_chunks else 1), (key, n)
        summary = cluster_stats(client)["index"]
        assert victim not in summary["workers"]


def test_restarted_worker_re_registers_verified_files(s3, s3_path, tmp_path):
    data = np.random.default_rng(11).random((128, 128))
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)
    with cache_cluster(directory=tmp_path / "cache") as (_cluster, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), data)
        before = cluster_stats(client)["workers"]
        host = client.run_on_scheduler(index_host)
        victim = max((a for a in before if a != host), key=lambda a: before[a]["entries"])
        assert before[victim]["entries"] >= 2
        victim_files = client.run(cache_keys, workers=[victim])[victim]
        # Damage one file while the worker still runs: the restart must not adopt it.
        damaged = victim_files[0]
        path = client.run(
            lambda dask_worker: str(dask_worker.extensions["zarr_cache"].disk.path_of(damaged)),
            workers=[victim],
        )[victim]
        with open(path, "r+b") as f:
            f.write(b"garbage!")

        client.restart_workers([victim])
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 3)
        new = next(a for a in client.scheduler_info()["workers"] if a not in before)
        wait_for(lambda: cluster_stats(client)["index"]["workers"].get(new, {}).get("entries"))
        after = cluster_stats(client)
        assert after["workers"][new]["entries"] == len(victim_files) - 1
        assert after["workers"][new]["bytes"] == before[victim]["bytes"] - 16 * 16 * 8
        indexed = after["index"]["workers"]
        assert victim not in indexed  # the old incarnation's entries are gone
        assert indexed[new]["entries"] == after["workers"][new]["entries"]

        np.testing.assert_array_equal(read_all(store, client), data)
        gets = chunk_gets(s3, s3_path)
        damaged_chunk = damaged.split("\x00")[1]
        assert gets.pop(damaged_chunk) == 2  # the damaged file was re-fetched once
        assert set(gets.values()) == {1}  # everything else came from disk or peers


def damage_one(dask_worker, prefix, mode):
    cache = dask_worker.extensions["zarr_cache"]
    key = next(k for k in sorted(cache.state.entries) if k.startswith(prefix))
    path = cache.disk.path_of(key)
    if mode == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif mode == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[0] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    return key


@pytest.mark.parametrize("mode", ["truncate", "corrupt", "missing"])
def test_damaged_cache_files_are_detected_and_refetched(s3, s3_path, client, mode):
    data = np.random.default_rng(12).random((32, 32))
    write_array(s3, s3_path, data, chunks=(16, 16))
    store = cached(s3, s3_path)
    s3.reset_counts()
    np.testing.assert_array_equal(read_all(store, client), data)
    owner = next(
        addr
        for addr, keys in client.run(cache_keys).items()
        if any(k.startswith(store.location.prefix("")) for k in keys)
    )
    prefix = store.location.prefix("")
    damaged = client.run(damage_one, prefix=prefix, mode=mode, workers=[owner])
    damaged = damaged[owner]
    path = damaged.split("\x00")[1]  # the object's full path
    # A small object's copy in memory was made from the file's verified bytes: it serves
    # the right bytes, and the damaged file is not read.
    np.testing.assert_array_equal(read_all(store, client), data)
    assert chunk_gets(s3, s3_path)[path] == 1
    client.run(forget_copy, key=damaged, workers=[owner])  # pushed out of memory
    for _ in range(2):  # now the file is read: its damage is found, the object fetched
        np.testing.assert_array_equal(read_all(store, client), data)
    gets = chunk_gets(s3, s3_path)
    assert gets.pop(path) == 2
    assert set(gets.values()) == {1}


def forget_copy(dask_worker, key):
    cache = dask_worker.extensions["zarr_cache"]
    with cache.state.lock:
        cache.state.entries.memory.drop(key)


def test_unwritable_cache_directory_degrades_to_read_through(s3, s3_path, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    data = np.arange(32 * 32, dtype="f8").reshape(32, 32)
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster(directory=blocker) as (_cluster, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        stats = cluster_stats(client)
        assert all(w["caching_disabled"] == 1 for w in stats["workers"].values())
        assert stats["total"]["entries"] == 0
        assert all(n <= 2 for n in chunk_gets(s3, s3_path).values())


def _limit_file_size(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_an_object_the_disk_refuses_costs_that_object_only(s3, s3_path):
    # Half the chunks compress to a few bytes, half stay 2 KiB: a worker whose files may
    # not exceed 1000 bytes (EFBIG) cannot cache the big ones, and keeps caching the rest.
    data = np.random.default_rng(13).random((64, 64))
    data[:32] = 1.0  # constant (not the fill value, so written): compresses to bytes
    write_array(s3, s3_path, data, chunks=(16, 16))
    with cache_cluster(n_workers=1) as (_cluster, client):
        [worker] = client.scheduler_info()["workers"]
        client.run(_limit_file_size, 1000)
        store = cached(s3, s3_path)
        for _ in range(3):
            np.testing.assert_array_equal(read_all(store, client), data)
        stats = cluster_stats(client)["workers"][worker]
        assert stats["caching_disabled"] == 0
        assert stats["disk_errors"] >= 8 and stats["entries"] == 8  # the 8 constant chunks
        gets = chunk_gets(s3, s3_path)
        assert sorted(gets.values()) == [1] * 8 + [3] * 8, gets


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 256 KiB filesystem (tmpfs) that fills up; skipped where mounting is not allowed."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_pauses_caching_until_space_is_freed(s3, s3_path, small_filesystem):
    data = np.random.default_rng(14).random((64, 128))  # 32 chunks of 2 KiB
    write_array(s3, s3_path, data, chunks=(16, 16), compressors=None)
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * (256 * 1024 - 16 * 1024))  # leaves room for a few files
    with cache_cluster(
        n_workers=1, directory=small_filesystem / "cache", timings={"disk_retry": 1.0}
    ) as (_c, client):
        store = cached(s3, s3_path)
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)  # nothing lost
        stats = cluster_stats(client)["total"]
        assert stats["caching_disabled"] == 1 and stats["disk_errors"] >= 1
        assert 0 < stats["entries"] < 32
        filler.unlink()  # space comes back: so does caching, by itself
        time.sleep(1.5)  # the pause after a failed write (disk_retry)
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        stats = cluster_stats(client)["total"]
        assert stats["caching_disabled"] == 0 and stats["entries"] == 32


def test_missing_chunks_read_as_fill_value_and_are_not_cached(s3, s3_path, client):
    arr = zarr.create_array(
        s3_store(s3, s3_path), shape=(32,), chunks=(8,), dtype="i4", fill_value=-1
    )
    arr[0:8] = np.arange(8)  # chunks 1-3 are never written
    store = cached(s3, s3_path)
    expected = np.concatenate([np.arange(8), np.full(24, -1)])
    asked = []
    for _ in range(3):
        s3.reset_counts()
        np.testing.assert_array_equal(read_all(store, client), expected)
        asked.append(sum(n for (_, path), n in s3.requests.items() if path.endswith("/c/1")))
    # No negative caching: an absent chunk is asked for again on every pass (s3fs asks
    # with HEAD/GET), so a chunk written later by anyone is seen at once.
    assert asked[0] > 0 and asked[1] == asked[0] and asked[2] == asked[0]
    arr[8:16] = np.arange(8)  # written later, straight to the source
    np.testing.assert_array_equal(read_all(store, client)[8:16], np.arange(8))


def _get_error(store, key):
    try:
        zarr.core.sync.sync(store.get(key, default_buffer_prototype()))
    except Exception as err:
        return type(err).__name__, str(err)
    return None


def _compute_error(store, client):
    try:
        read_all(store, client)
    except Exception as err:
        return type(err).__name__, str(err)
    return None


@pytest.mark.parametrize(("status", "error"), [(403, "PermissionError"), (500, "OSError")])
def test_source_errors_propagate_and_are_not_cached(s3, s3_path, client, status, error):
    data = np.arange(16, dtype="f8")
    write_array(s3, s3_path, data, chunks=(8,))
    # One attempt: botocore backs off for ~40 s over a 500 otherwise, the same
    # with and without the cache.
    once = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    direct = s3_store(s3, s3_path, read_only=True, **once)
    store = ClusterCacheStore(direct)
    s3.fail(f"{s3_path}/c/1", status)
    try:
        # In a task, the cached store raises exactly what the source raises ...
        in_task = client.submit(_get_error, store, "c/1", pure=False).result()
        assert in_task == client.submit(_get_error, direct, "c/1", pure=False).result()
        assert in_task[0] == error
        # ... and so does a whole computation, as the client sees it.
        assert _compute_error(store, client) == _compute_error(direct, client) is not None
    finally:
        s3.fail(f"{s3_path}/c/1", None)
    s3.reset_counts()
    for _ in range(2):
        np.testing.assert_array_equal(read_all(store, client), data)
    assert chunk_gets(s3, s3_path)[f"{s3_path}/c/1"] == 1
    assert cluster_stats(client)["index"]["pending"] == 0


def test_objects_larger_than_max_size_are_served_not_cached(s3, s3_path):
    data = np.random.default_rng(14).random((64, 64))
    write_array(s3, s3_path, data, chunks=(32, 32), compressors=None)  # 8 KiB chunks
    with cache_cluster(max_size=4096) as (_cluster, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        for _ in range(2):
            np.testing.assert_array_equal(read_all(store, client), data)
        assert cluster_stats(client)["total"]["entries"] == 0
        assert set(chunk_gets(s3, s3_path).values()) == {2}


def _range_reads(store, ranges):
    out = []
    for r in ranges:
        try:
            buf = zarr.core.sync.sync(store.get("c/0", default_buffer_prototype(), r))
            out.append(None if buf is None else buf.to_bytes())
        except Exception as err:  # compare the error type with the source's own
            out.append(type(err).__name__)
    return out


def test_out_of_bounds_byte_ranges_behave_like_the_source(s3, s3_path, client):
    write_array(s3, s3_path, np.arange(8, dtype="i8"), chunks=(8,), compressors=None)
    ranges = [RangeByteRequest(60, 70), RangeByteRequest(100, 200), RangeByteRequest(3, 3)]
    direct = _range_reads(s3_store(s3, s3_path, read_only=True), ranges)
    store = cached(s3, s3_path)
    for _ in range(2):  # cold (fetch) and warm (served from the cache)
        assert client.submit(_range_reads, store, ranges, pure=False).result() == direct


def test_invalid_keys_are_rejected_inside_tasks(s3, s3_path, client):
    write_array(s3, s3_path, np.arange(4), chunks=(4,))
    store = cached(s3, s3_path)
    with pytest.raises(InvalidCacheKeyError):
        client.submit(
            lambda s: zarr.core.sync.sync(s.get("../../etc/passwd", default_buffer_prototype())),
            store,
        ).result()


async def _ask_peer(dask_worker, key):
    return await dask_worker.extensions["zarr_cache"].zarr_cache_get(key=key)


def test_peer_handler_serves_only_cache_entries(s3, s3_path, client):
    write_array(s3, s3_path, np.arange(16), chunks=(4,))
    read_all(cached(s3, s3_path), client)
    outside = [
        "../../../../etc/passwd",
        "/etc/passwd",
        "ns-x/../../../../etc/hostname",
        "",
        "\x00",
    ]
    for key in outside:
        replies = client.run(_ask_peer, key=key)
        assert all(r == {"status": "missing"} for r in replies.values()), (key, replies)
    # A real entry is served, with its checksum.
    prefix = cached(s3, s3_path).location.prefix("")
    owners = client.run(cache_keys)
    owner, key = next((a, k) for a, keys in owners.items() for k in keys if k.startswith(prefix))
    reply = client.run(_ask_peer, key=key, workers=[owner])[owner]
    assert reply["status"] == "ok" and isinstance(reply["checksum"], int)


def _hammer(store, n_threads):
    barrier = threading.Barrier(n_threads)
    results = []

    def read():
        barrier.wait()
        results.append(float(zarr.open_array(store, mode="r")[:].sum()))

    threads = [threading.Thread(target=read) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_64_concurrent_readers_of_one_key_make_one_get(s3, s3_path, client):
    data = np.arange(1024, dtype="f8")
    write_array(s3, s3_path, data, chunks=(1024,))
    store = cached(s3, s3_path)
    s3.reset_counts()
    s3.latency = 0.2  # keep the one fetch in flight while every reader arrives
    try:
        workers = sorted(client.scheduler_info()["workers"])
        futures = [
            client.submit(_hammer, store, n, workers=[w], pure=False)
            for w, n in zip(workers, (22, 21, 21), strict=True)
        ]
        wait(futures)
    finally:
        s3.latency = 0
    results = [r for f in futures for r in f.result()]
    assert len(results) == 64 and set(results) == {data.sum()}
    assert chunk_gets(s3, s3_path) == {f"{s3_path}/c/0": 1}
