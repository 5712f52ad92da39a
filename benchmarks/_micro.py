"""Micro-benchmarks: one index shard's logic in-process, peer transfer vs a raw RPC."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

from distributed import Client

from dask_zarr_cache import ZarrCachePlugin
from dask_zarr_cache.core.protocol import NOBODY, pack
from dask_zarr_cache.index.digests import key_digest
from dask_zarr_cache.index.host import IndexHost
from dask_zarr_cache.index.shard import CacheIndex
from dask_zarr_cache.testing import loopback_cluster

BATCH = 1000


def _digests(n: int) -> list[int]:
    return [
        key_digest(f"ns-0123456789abcdef0123\x00bucket/data.zarr/c/{i // 1000}/{i % 1000}")
        for i in range(n)
    ]


def index_throughput(n: int) -> dict[str, float]:
    """Key operations per second of one shard's batched acquire, commit and drop reports.

    Batches go through the same handlers and wire format as the shard's callers (not the
    network); the keys' digests are computed beforehand, as workers send them.
    """
    host = IndexHost()
    digests_all = _digests(n)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(host.zarr_cache_index_create("s", None, "tinylfu", 60.0))
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            digests = pack(digests_all[i : i + BATCH])
            loop.run_until_complete(
                host.zarr_cache_index_exchange("s", "tcp://w:1", digests, list(NOBODY), pack([]))
            )
        acquire = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            rows = pack([(d, 1) for d in digests_all[i : i + BATCH]])
            loop.run_until_complete(
                host.zarr_cache_index_exchange("s", "tcp://w:1", pack([]), list(NOBODY), rows)
            )
        commit = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            rows = pack([(d, 1) for d in digests_all[i : i + BATCH]])
            loop.run_until_complete(host.zarr_cache_index_touch("s", "tcp://w:1", rows))
        touch = time.perf_counter() - start
    finally:
        loop.close()
    return {"acquire": n / acquire, "commit": n / commit, "drop": n / touch}


def index_memory_per_key(n: int) -> float:
    """Bytes one shard holds per ready entry, measured by tracemalloc (numpy included)."""
    gc.collect()
    tracemalloc.start()
    index = CacheIndex()
    digests = _digests(n)
    for i in range(0, n, BATCH):
        batch = digests[i : i + BATCH]
        index.acquire("tcp://w:1", batch)
        index.commit("tcp://w:1", [(d, j) for j, d in enumerate(batch)])
    del digests, batch
    gc.collect()
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == n
    return current / n


def index_markdown(sizes: list[int]) -> str:
    """Index throughput and memory per key as a markdown table."""
    lines = [
        "| keys | acquire ops/s | commit ops/s | drop ops/s | bytes per key |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        ops = index_throughput(n)
        mem = index_memory_per_key(n)
        lines.append(
            f"| {n:,} | {ops['acquire']:,.0f} | {ops['commit']:,.0f} | "
            f"{ops['drop']:,.0f} | {mem:.0f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


# -- peer transfer ----------------------------------------------------------------------
def _fill_cache(n: int, size: int, dask_worker=None) -> list[str]:
    import os
    import time as _time

    from dask_zarr_cache.worker.state import LocalEntry

    cache = dask_worker.extensions["zarr_cache"]
    payload = os.urandom(size)
    keys = []
    for i in range(n):
        key = f"ns-bench\x00peer/{size}/{i}"
        crc = cache.disk.write(key, payload, cache.state.epoch, cache.state.applied_seq)
        fetch, _ = cache.state.begin_fetch(key)
        cache.state.admit(key, LocalEntry(size, crc, _time.time()), fetch)
        cache.state.end_fetch(key, fetch)
        keys.append(key)
    dask_worker._bench_payload = payload
    return keys


def _install_raw_handler(dask_worker) -> None:
    from distributed.protocol import to_serialize

    async def raw_get(key: str) -> dict:
        return {"status": "ok", "data": to_serialize(dask_worker._bench_payload)}

    dask_worker.handlers["bench_raw_get"] = raw_get


async def _timed_gets(source: str, keys: list[str], in_flight: int, raw: bool, dask_worker=None):
    cache = dask_worker.extensions["zarr_cache"]
    queue = list(keys)
    total = 0

    async def one() -> None:
        nonlocal total
        while queue:
            key = queue.pop()
            if raw:
                reply = await dask_worker.rpc(source).bench_raw_get(key=key)
                total += len(reply["data"])
            else:
                reply = await cache.peers.request(source, key, 30.0)
                assert reply["status"] == "ok"
                total += len(reply["data"])

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(in_flight)))
    return total / (time.perf_counter() - start) / 2**20


def peer_markdown(n: int = 100) -> str:
    """Peer transfer MiB/s for 1 and 4 MiB objects vs a raw distributed RPC."""
    lines = [
        "| object | in flight | peer get MiB/s | raw RPC MiB/s | peer / raw |",
        "|---|---|---|---|---|",
    ]
    with (
        loopback_cluster(2, 1) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ZarrCachePlugin(max_size="4GiB"))
        source, reader = sorted(client.scheduler_info()["workers"])
        client.run(_install_raw_handler, workers=[source])
        for size_mib in (1, 4):
            keys = client.run(_fill_cache, n, size_mib * 2**20, workers=[source])[source]
            for in_flight in (1, 4):
                rates = {}
                for raw in (False, True, False, True):  # interleaved, best of two each
                    rate = client.run(_timed_gets, source, keys, in_flight, raw, workers=[reader])[
                        reader
                    ]
                    rates[raw] = max(rates.get(raw, 0.0), rate)
                lines.append(
                    f"| {size_mib} MiB | {in_flight} | {rates[False]:,.0f} | "
                    f"{rates[True]:,.0f} | {rates[False] / rates[True]:.2f} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


# -- local hits ---------------------------------------------------------------------------
async def _hit_latencies(n: int, size: int, label: str, dask_worker=None) -> list[float]:
    """Seconds of each of ``n`` warm hits of ``size`` bytes through ``WorkerCache.get``."""
    cache = dask_worker.extensions["zarr_cache"]
    payload = b"x" * size

    async def source() -> bytes:
        return payload

    keys = [f"ns-bench\x00hits-{label}/{size}/{i}" for i in range(n)]
    for key in keys:  # the cold pass: fetched and kept
        await cache.get(key, source)
    await cache.idle()
    latencies = []
    for _ in range(2):  # the second warm pass is timed
        latencies.clear()
        for key in keys:
            start = time.perf_counter()
            await cache.get(key, source)
            latencies.append(time.perf_counter() - start)
    return sorted(latencies)


def hits_markdown(n: int = 2000, sizes: tuple[int, ...] = (1024, 65536)) -> str:
    """p50 and p99 of a warm local hit, the memory copies off (file reads) and on."""
    lines = [
        "| object | memory copies | p50 us | p99 us | mean us |",
        "|---|---|---|---|---|",
    ]
    with loopback_cluster(1, 1) as cluster, Client(cluster) as client:
        (worker,) = client.scheduler_info()["workers"]
        for memory_size in (0, None):
            client.register_plugin(ZarrCachePlugin(max_size="4GiB", memory_size=memory_size))
            for size in sizes:
                label = "off" if memory_size == 0 else "on"
                lat = client.run(_hit_latencies, n, size, label, workers=[worker])[worker]
                p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
                lines.append(
                    f"| {size // 1024} KiB | {label} | {p50 * 1e6:.1f} | {p99 * 1e6:.1f} | "
                    f"{sum(lat) / len(lat) * 1e6:.1f} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    hits_markdown()
