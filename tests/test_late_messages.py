"""Late messages and dead peers, made deterministic: two defects the chaos suite finds.

Real worker processes, the loopback S3 server, the cache's own handlers wrapped in one
worker's process with fixed delays (``benchmarks._chaos_delays``).  Both tests fail on the
code they were written against (b1b3059); see ``benchmarks/chaos.py`` for the random
version of each.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import dask.config
import numpy as np
import zarr
from distributed import Client

from benchmarks._chaos_cluster import ProcessCluster
from benchmarks._chaos_delays import INVALIDATE_HANDLER, PEER_GET_HANDLER, install_fixed_delays
from dask_zarr_cache import ClusterCacheStore, ZarrCachePlugin, cluster_stats
from dask_zarr_cache.testing import loopback_cluster
from tests.conftest import cached, s3_store, write_array

if TYPE_CHECKING:
    from collections.abc import Iterator

CHUNK = 256
N_CHUNKS = 8


def _version(chunk: int, version: int) -> int:
    return version * 10_000 + chunk


def _data(version: int) -> np.ndarray:
    return np.repeat([_version(c, version) for c in range(N_CHUNKS)], CHUNK).astype("int64")


@contextlib.contextmanager
def _cluster(n_workers: int, threads: int, flush_interval: str = "100ms") -> Iterator[Client]:
    """Worker processes on loopback with the cache (1 GiB)."""
    with dask.config.set({"zarr-cache.flush-interval": flush_interval}):
        cluster = loopback_cluster(n_workers, threads)
    with cluster, Client(cluster) as client:
        client.register_plugin(ZarrCachePlugin(max_size="1GiB"))
        yield client


def _open(store) -> None:
    zarr.open_array(store, mode="r")


def _timed_read(store, chunk: int) -> tuple[float, float, int]:
    """Read one chunk; ``(t_invoke, t_return, first value)``, times taken around the read."""
    arr = zarr.open_array(store, mode="r")
    start = time.time()
    values = arr[chunk * CHUNK : (chunk + 1) * CHUNK]
    end = time.time()
    assert (values == values[0]).all()
    return start, end, int(values[0])


def _peer_reads(client: Client, address: str) -> int:
    return cluster_stats(client)["workers"][address]["peer_reads"]


def _index_host(client: Client) -> str | None:
    layout = client.sync(client.scheduler.zarr_cache_index)
    return layout[0]["address"] if layout and layout[0] else None


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def _write_while_reading(s3, s3_path, client, store, x, k) -> tuple[float, list]:
    """Write chunk k from the client while reads of k run on X; (write's return, reads)."""
    times: dict[str, float] = {}
    arr = zarr.open_array(ClusterCacheStore(s3_store(s3, s3_path)), mode="r+")

    def write() -> None:
        arr[k * CHUNK : (k + 1) * CHUNK] = np.full(CHUNK, _version(k, 2), dtype="int64")
        times["return"] = time.time()

    writer = threading.Thread(target=write)
    futures = []
    writer.start()
    while writer.is_alive() or time.time() < times["return"] + 1.0:
        futures.append(
            client.submit(_timed_read, store, k, workers=[x], allow_other_workers=False, pure=False)
        )
        time.sleep(0.025)
    writer.join(30)
    return times["return"], [f.result(60) for f in futures]


def test_no_read_after_a_write_gets_old_bytes_through_an_owner_hint(s3, s3_path):
    """Worker C owns chunk k; worker X read k from C once, so X holds a hint naming C.

    A client writes k.  The invalidation reaches C 150 ms after the other workers, and
    C's peer replies take 0.4 s on the wire.  X, already invalidated, reads k through its
    hint from C, which still serves the old file; reads on X that start after the write
    returned join that fetch in flight.  Promise 1 (read-your-writes) says none of them
    may see the old bytes.

    A worker also learns of writes from its own catch-up with the scheduler (every
    ``flush-interval``, here the default 1 s), and one that comes inside the 150 ms lets
    C drop the file in time: about one attempt in seven.  So the test makes up to four
    attempts, each on a chunk of its own.
    """
    chunks = [1, 2, 3, 4]
    write_array(s3, s3_path, _data(1), chunks=(CHUNK,))
    # Many threads on X: reads that join a fetch in flight hold theirs until it ends.
    with _cluster(3, threads=32, flush_interval="1s") as client:
        store = cached(s3, s3_path)
        workers = sorted(client.scheduler_info()["workers"])
        c, x = workers[0], workers[1]
        # X fetches the metadata (its tasks find it on disk), C fetches the chunks: C owns them.
        client.submit(_open, store, workers=[x], pure=False).result(60)
        for k in chunks:
            value = client.submit(_timed_read, store, k, workers=[c], pure=False).result(60)[2]
            assert value == _version(k, 1)
        time.sleep(0.5)  # C's commits reach the index
        before = _peer_reads(client, x)
        for k in chunks:
            value = client.submit(_timed_read, store, k, workers=[x], pure=False).result(60)[2]
            assert value == _version(k, 1)
        assert _peer_reads(client, x) == before + len(chunks), "X must have read from C"
        wrapped = client.run(install_fixed_delays, invalidate=0.15, peer=0.4, workers=[c])[c]
        assert sorted(wrapped) == sorted([INVALIDATE_HANDLER, PEER_GET_HANDLER])
        outcomes = []
        for k in chunks:
            returned, reads = _write_while_reading(s3, s3_path, client, store, x, k)
            after = [r for r in reads if r[0] > returned]
            stale = [r for r in after if r[2] != _version(k, 2)]
            outcomes.append((k, len(reads), len(after), len(stale)))
            print(
                f"chunk {k}: {len(reads)} reads on X, {len(after)} started after the write "
                f"returned, {len(stale)} of them stale"
            )
            assert after, "no read on X started after the write returned: the test did not run"
            if stale:
                break
    stale_total = sum(o[3] for o in outcomes)
    assert not stale_total, (
        f"reads on X that started after the write returned saw the old bytes: "
        f"{stale_total} of {sum(o[2] for o in outcomes)} (chunk, reads, after, stale): {outcomes}"
    )


def _read_after(store, flag: str, chunk: int) -> float:
    """On B: once ``flag`` exists, open the array and read ``chunk``; the seconds it took."""
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.005)
    start = time.monotonic()
    values = zarr.open_array(store, mode="r")[chunk * CHUNK : (chunk + 1) * CHUNK]
    elapsed = time.monotonic() - start
    assert (values == _version(chunk, 1)).all()
    return elapsed


def test_a_read_never_waits_out_a_dead_index_host(s3, s3_path, tmp_path):
    """H hosts index shard 0 and served B every chunk (B holds hints naming H).

    H (no nanny: it stays dead) is SIGKILLed while B's two threads run read tasks; they
    read as soon as the scheduler has noticed the death.  A read on a healthy worker must
    not wait for a dead peer or index host for more than ~2 s (failure-model.md: "calls to
    that shard fail fast").  Today B dials H's address (its hint, or its index location)
    after its connection pool dropped H, so nothing cancels the dial; distributed retries
    the refused connection until the connect timeout (30 s), and the index cannot be
    re-created on B meanwhile (building an actor needs a free worker thread).
    """
    write_array(s3, s3_path, _data(1), chunks=(CHUNK,))
    env = {"DASK_ZARR_CACHE__MAX_SIZE": "1GiB", "DASK_ZARR_CACHE__FLUSH_INTERVAL": "100ms"}
    cluster = ProcessCluster(str(tmp_path), env, nanny=False)
    try:
        cluster.start_scheduler()
        cluster.start_worker("h")  # first: the index shard goes to the first worker
        with Client(cluster.address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            _wait_for(lambda: _index_host(client) is not None, timeout=60)
            cluster.start_worker("b")
            client.wait_for_workers(2, timeout=60)
            _wait_for(lambda: len(cluster_stats(client)["workers"]) == 2, timeout=60)
            h = _index_host(client)
            b = next(a for a in client.scheduler_info()["workers"] if a != h)
            store = cached(s3, s3_path)
            for chunk in range(N_CHUNKS):  # H reads from the source, then B from H
                client.submit(_timed_read, store, chunk, workers=[h], pure=False).result(60)
            time.sleep(0.5)  # H's commits reach the index
            before = _peer_reads(client, b)
            for chunk in range(N_CHUNKS):
                client.submit(_timed_read, store, chunk, workers=[b], pure=False).result(60)
            # Every task also reads the metadata from H: two peer reads each.
            assert _peer_reads(client, b) - before >= N_CHUNKS, "B must have read from H"
            pid = client.run(os.getpid, workers=[h])[h]
            flag = str(tmp_path / "h-is-gone")
            reads = [
                client.submit(
                    _read_after,
                    store,
                    flag,
                    chunk,
                    workers=[b],
                    allow_other_workers=False,
                    pure=False,
                )
                for chunk in (0, 1)
            ]
            time.sleep(0.5)  # both run (B has two threads), waiting for the flag
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: h not in client.scheduler_info()["workers"], timeout=10)
            open(flag, "w").close()
            elapsed = [f.result(120) for f in reads]
    finally:
        cluster.close()
    print(f"reads on B right after the index host died took {elapsed} s")
    assert max(elapsed) < 2.0, f"reads on B waited {max(elapsed):.1f} s for the dead index host"
