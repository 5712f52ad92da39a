"""Load generator for the scheduler's write path: writes/s, latency, CPU per write, by workers.

::

    python -m benchmarks.write_load [--workers 4,100,1000] [--seconds 5] [--rtt-ms 1]

The scheduler's real :class:`~dask_zarr_cache.writes.coordinator.WriteCoordinator` runs in
this process against ``--workers`` simulated workers: each answers a push after
``--rtt-ms`` (a round trip, no CPU) and writes one chunk after another, as a worker with
one thread running ``to_zarr`` does (its write returns, then it writes the next).  The
messages are not serialized and cross no socket, so the CPU per write here is the
scheduler's own bookkeeping; the messages per write are what a real network carries, and
what a scheduler pays ~50-100 us of CPU each for in distributed's comms.  Each row runs
once with writes group-committed (what the plugin does) and once with each write applied
alone (the design before, for comparison) up to ``--alone-up-to`` workers: alone, every
worker's write in flight pushes to every worker, W x W pushes at once (a million tasks at
1,000 workers).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from dask_zarr_cache.core.config import CacheSettings
from dask_zarr_cache.writes.coordinator import WriteCoordinator

__all__ = ["main"]


class SimulatedWorkers:
    """``ask`` for the coordinator: every worker applies a push after one round trip."""

    def __init__(self, n: int, rtt: float) -> None:
        self.addresses = [f"tcp://10.0.{i // 250}.{i % 250}:8788" for i in range(n)]
        self.rtt = rtt
        self.messages = 0

    async def ask(self, worker: str, op: str, timeout: float, **message: Any) -> Any:
        self.messages += 1
        await asyncio.sleep(self.rtt)
        return message["seq"]


async def _no_index(keys: list[str]) -> None:
    return None


async def run(n: int, seconds: float, rtt: float, alone: bool) -> dict[str, float]:
    """Every simulated worker writes for ``seconds``; throughput, latency, CPU, messages."""
    workers = SimulatedWorkers(n, rtt)
    members = set(workers.addresses)
    coordinator = WriteCoordinator(
        CacheSettings(max_size=1), workers.ask, lambda: members, _no_index, not alone
    )
    for address in workers.addresses:
        await coordinator.catch_up(address, None, 0)
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def writer(i: int) -> None:
        chunk = 0
        while time.monotonic() < stop:
            started = time.perf_counter()
            await coordinator.write([f"ns\x00data.zarr/c/{i}/{chunk}"], [], None)
            latencies.append(time.perf_counter() - started)
            chunk += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(n)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    writes = len(latencies)
    latencies.sort()
    return {
        "writes/s": writes / wall,
        "p50 ms": 1000 * statistics.median(latencies),
        "p99 ms": 1000 * latencies[int(0.99 * (writes - 1))],
        "cpu us/write": 1e6 * cpu / writes,
        "messages/write": workers.messages / writes,
        "batches": coordinator.log.seq,
        "writes": writes,
    }


def main(argv: list[str] | None = None) -> int:
    """Print one markdown table row per worker count and mode."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.write_load")
    parser.add_argument("--workers", default="4,100,1000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rtt-ms", type=float, default=1.0)
    parser.add_argument("--alone-up-to", type=int, default=100)
    args = parser.parse_args(argv)
    print(
        f"Scheduler write path, {args.seconds:g} s per row, simulated workers answer after "
        f"{args.rtt_ms:g} ms, each writes one chunk after another.\n"
    )
    print(
        "| workers | mode | writes/s | p50 ms | p99 ms | scheduler CPU us/write | "
        "messages/write | writes per batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(w) for w in args.workers.split(",")):
        for alone in (False, True)[: 1 + (n <= args.alone_up_to)]:
            r = asyncio.run(run(n, args.seconds, args.rtt_ms / 1000, alone))
            mode = "each alone" if alone else "group commit"
            print(
                f"| {n} | {mode} | {r['writes/s']:,.0f} | {r['p50 ms']:.1f} | "
                f"{r['p99 ms']:.1f} | {r['cpu us/write']:.0f} | {r['messages/write']:.2f} | "
                f"{r['writes'] / max(r['batches'], 1):.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
