"""Load generator for the index: decisions/s, latency, CPU per shard, memory, recovery.

``python -m benchmarks.index_load`` starts a process cluster whose scheduler plugin creates
the index shards (``zarr-cache.index-shards``), then load processes whose simulated
workers (:mod:`benchmarks._index_sim`) call the shards over real comms, the way worker
caches do.  It prints, per shard count, simulated workers and trace: acquire decisions
per second, p50/p99 latency, keys per acquire message, and the CPU the shard processes
and the load processes spent per decision; then the index's bytes per key (RSS growth of
the shard's process) and the time the cluster needs to be back to read-once after losing
a shard.

Everything runs on this machine: load processes, shards, scheduler share its cores, so a
rate here is the machine's, and the CPU per decision is what scales.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections import Counter
from typing import Any

import dask.config
import numpy as np
import psutil
from distributed import Client

from benchmarks import _report
from benchmarks._index_sim import TRACES, LoadSpec, run_process
from dask_zarr_cache import ZarrCachePlugin
from dask_zarr_cache.testing import loopback_cluster


@contextlib.contextmanager
def index_cluster(shards: int, spare: int = 1):
    """A process cluster with ``shards`` index shards, each on its own worker."""
    with (
        dask.config.set({"zarr-cache.index-shards": shards}),
        loopback_cluster(shards + spare, threads_per_worker=1) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ZarrCachePlugin(max_size="1GiB"))
        shard_hosts(client, wait=True)
        yield client


def _locations(dask_scheduler) -> list[Any]:
    return dask_scheduler.extensions["zarr_cache"].shards.locations


def shard_hosts(client: Client, wait: bool = False, timeout: float = 60) -> list[str]:
    """Addresses of the shards' workers (waiting until every shard exists)."""
    deadline = time.time() + timeout
    while True:
        locations = client.run_on_scheduler(_locations)
        if None not in locations or not wait:
            return [loc and loc["address"] for loc in locations]
        if time.time() > deadline:
            raise TimeoutError(f"index shards not created: {locations}")
        time.sleep(0.2)


async def _forget_workers(dask_scheduler, addresses: list[str]) -> None:
    """The index forgets simulated workers once their run is over (as if they left)."""
    index = dask_scheduler.extensions["zarr_cache"].index
    await asyncio.gather(*(index.remove_worker(a) for a in addresses))


def _cpu_seconds() -> float:
    times = psutil.Process(os.getpid()).cpu_times()
    return times.user + times.system


def _run_load(specs: list[LoadSpec]) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(specs), mp_context=context) as pool:
        results = list(pool.map(run_process, specs))
    late = [r["connect seconds"] for r in results if r["late"]]
    if late:  # its callers started inside the window: the numbers would be off
        raise RuntimeError(f"load processes registered for {max(late):.1f} s: raise setup")
    return results


def measure(
    client: Client,
    *,
    workers: int,
    callers: int,
    trace: str,
    held: int,
    seconds: float,
    processes: int,
    setup: float,
) -> dict[str, Any]:
    """Run one load point; returns its numbers."""
    hosts = shard_hosts(client, wait=True)
    start_at = time.time() + setup
    specs = [
        LoadSpec(
            client.scheduler.address, p, processes, workers, callers, trace, held, start_at, seconds
        )
        for p in range(processes)
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as side:
        load = side.submit(_run_load, specs)
        time.sleep(max(0.0, start_at - time.time()))
        before = client.run(_cpu_seconds, workers=hosts)
        time.sleep(max(0.0, start_at + seconds - time.time()))
        after = client.run(_cpu_seconds, workers=hosts)
        results = load.result()
    client.run_on_scheduler(_forget_workers, addresses=[f"tcp://sim-{n}:1" for n in range(workers)])
    kinds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    latencies: list[float] = []
    for r in results:
        kinds.update(r["kinds"])
        calls.update(r["calls"])
        latencies += r["latencies"]
    decisions = sum(kinds.values())
    shard_cpu = sum(after[h] - before[h] for h in hosts)
    return {
        "decisions/s": decisions / seconds,
        "p50 ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99 ms": 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "keys/message": decisions / max(1, calls["exchange"]),
        "calls/s": sum(calls.values()) / seconds,
        "shard CPU %": 100 * shard_cpu / seconds,
        "shard CPU µs/decision": 1e6 * shard_cpu / max(1, decisions),
        "load CPU µs/decision": 1e6 * sum(r["cpu"] for r in results) / max(1, decisions),
        "callers": sum(r["callers"] for r in results),
        "kinds": dict(kinds),
        "failures": sum(len(r["failures"]) for r in results),
    }


def throughput_table(
    shard_counts: list[int],
    worker_counts: list[int],
    traces: list[str],
    *,
    callers: int,
    seconds: float,
    processes: int,
    held: int,
) -> tuple[str, list[dict[str, Any]]]:
    """Every shard count x simulated workers x trace; a markdown table and the rows."""
    rows = []
    for shards in shard_counts:
        with index_cluster(shards) as client:
            for workers in worker_counts:
                for trace in traces:
                    numbers = measure(
                        client,
                        workers=workers,
                        callers=max(callers, workers),
                        trace=trace,
                        held=held,
                        seconds=seconds,
                        processes=processes,
                        setup=8 + workers / 40,
                    )
                    rows.append({"shards": shards, "workers": workers, "trace": trace, **numbers})
                    print(_row_line(rows[-1]), flush=True)
    head = [
        "shards",
        "sim. workers",
        "trace",
        "callers",
        "decisions/s",
        "p50 ms",
        "p99 ms",
        "keys/message",
        "shard CPU %",
        "shard CPU µs/decision",
        "load CPU µs/decision",
    ]
    body = (
        [
            r["shards"],
            r["workers"],
            r["trace"],
            r["callers"],
            f"{r['decisions/s']:,.0f}",
            f"{r['p50 ms']:.1f}",
            f"{r['p99 ms']:.1f}",
            f"{r['keys/message']:.1f}",
            f"{r['shard CPU %']:.0f}",
            f"{r['shard CPU µs/decision']:.1f}",
            f"{r['load CPU µs/decision']:.1f}",
        ]
        for r in rows
    )
    return _report.table(head, body), rows


def _row_line(r: dict[str, Any]) -> str:
    return (
        f"shards={r['shards']} workers={r['workers']} trace={r['trace']}: "
        f"{r['decisions/s']:,.0f} decisions/s, p50 {r['p50 ms']:.1f} ms, p99 {r['p99 ms']:.1f} "
        f"ms, {r['keys/message']:.1f} keys/message, shard CPU {r['shard CPU %']:.0f}% "
        f"({r['shard CPU µs/decision']:.1f} µs/decision), kinds {r['kinds']}"
    )


# -- memory ---------------------------------------------------------------------------------
def _fill_index(dask_worker, targets: list[int], batch: int = 100_000) -> list[dict[str, float]]:
    """On a shard's worker: register random digests up to each target; RSS growth per key."""
    (index,) = dask_worker.extensions["zarr_cache_index"].shards.values()
    rng = np.random.default_rng(0)
    process = psutil.Process(os.getpid())
    gc.collect()
    base, filled, out = process.memory_info().rss, len(index), []
    for target in targets:
        while filled < target:
            n = min(batch, target - filled)
            digests = (rng.integers(1, 2**63, n, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
            index.register(
                f"tcp://sim-{filled // batch % 100}:1", [(d, 1) for d in digests.tolist()]
            )
            filled += n
        gc.collect()
        grown = process.memory_info().rss - base
        out.append(
            {"keys": filled, "bytes/key": grown / filled, "table bytes/key": index.nbytes / filled}
        )
    return out


def memory(targets: list[int]) -> list[dict[str, float]]:
    """Bytes per key of one shard at each of ``targets`` keys (RSS of its process)."""
    with index_cluster(1, spare=0) as client:
        (host,) = shard_hosts(client)
        return client.run(_fill_index, workers=[host], targets=targets)[host]


# -- recovery -------------------------------------------------------------------------------
def recovery(
    *, shards: int, held: int, workers: int, callers: int, processes: int, seconds: float
) -> dict[str, Any]:
    """Kill shard 0's worker mid-run; time until no read goes to the source for held keys.

    The load is the warm trace (every read is of a held key), so a fetch decision or a
    failed index call after the kill is a duplicate source read for a cached chunk.
    """
    with index_cluster(shards) as client:
        hosts = shard_hosts(client, wait=True)
        setup = 20 + held / 100_000
        start_at = time.time() + setup
        specs = [
            LoadSpec(
                client.scheduler.address,
                p,
                processes,
                workers,
                callers,
                "warm",
                held,
                start_at,
                seconds,
            )
            for p in range(processes)
        ]
        with concurrent.futures.ThreadPoolExecutor(1) as side:
            load = side.submit(_run_load, specs)
            killed_at = start_at + seconds / 4
            time.sleep(max(0.0, killed_at - time.time()))
            killed_at = time.time()
            client.run(_sigkill, workers=[hosts[0]], wait=False)
            back = None
            while time.time() < start_at + seconds:
                now = shard_hosts(client)
                if back is None and now[0] not in (None, hosts[0]):
                    back = time.time() - killed_at
                time.sleep(0.1)
            results = load.result()
    duplicates = sorted(t for r in results for t in [*r["duplicates"], *r["failures"]])
    after = [t - killed_at for t in duplicates if t >= killed_at]
    calls: Counter[str] = Counter()
    for r in results:
        calls.update(r["calls"])
    return {
        "keys per shard": held // shards,
        "new shard located after s": back,
        "duplicate reads after the kill": len(after),
        "last duplicate after s": max(after) if after else 0.0,
        "duplicates before the kill": len(duplicates) - len(after),
        "register calls": calls["register"],
        "decisions": sum(sum(r["kinds"].values()) for r in results),
        "registration at start, s": max(r["connect seconds"] for r in results),
    }


async def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 10, 100, 1000])
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=TRACES)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--held", type=int, default=100_000)
    parser.add_argument("--memory-keys", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--recovery-keys", type=int, default=1_000_000, help="per shard; 0: skip")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    sections = [
        f"# Index load ({started}, {os.cpu_count()} cores)",
        "`" + " ".join(["python -m benchmarks.index_load", *(argv or sys.argv[1:])]) + "`",
    ]
    if not args.skip_throughput:
        table, _ = throughput_table(
            args.shards, args.workers, args.traces, callers=args.callers,
            seconds=args.seconds, processes=args.processes, held=args.held,
        )  # fmt: skip
        sections += [
            f"## Acquire decisions ({args.processes} load processes, at least {args.callers} "
            f"callers, {args.seconds:g} s per point)",
            table,
        ]
        print(table, flush=True)
    if args.memory_keys:
        rows = memory(args.memory_keys)
        body = [
            [f"{r['keys']:,}", f"{r['bytes/key']:.1f}", f"{r['table bytes/key']:.1f}"] for r in rows
        ]
        sections += [
            "## Memory of one shard (RSS growth of its worker process)",
            _report.table(["keys", "bytes/key (RSS)", "bytes/key (table columns)"], body),
        ]
        print(sections[-1], flush=True)
    if args.recovery_keys:
        shards = 2
        result = recovery(
            shards=shards, held=shards * args.recovery_keys, workers=100, callers=args.callers,
            processes=args.processes, seconds=60,
        )  # fmt: skip
        sections += [
            f"## Losing a shard of {args.recovery_keys:,} keys ({shards} shards, 100 simulated "
            "workers, warm reads)",
            _report.table(["", "measured"], [[k, _fmt(v)] for k, v in result.items()]),
        ]
        print(sections[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(sections) + "\n")


def _fmt(value: Any) -> str:
    return (
        f"{value:.2f}"
        if isinstance(value, float)
        else f"{value:,}"
        if isinstance(value, int)
        else str(value)
    )


if __name__ == "__main__":
    main()
