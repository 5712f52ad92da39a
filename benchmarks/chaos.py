"""Jepsen-style chaos run of the cluster cache on real processes.

::

    python -m benchmarks.chaos [--seconds 120] [--seed N] [--mode kills|slow|both]
        [--workers 4] [--chunks 32] [--read-stall-bound 12] [--write-stall-bound 20]
        [--json PATH] [--history PATH]

A scheduler and ``--workers`` nanny workers (``python -m dask ...``, the cache installed by
``--preload dask_zarr_cache.preload``, cache directories kept across restarts) read and
write a zarr array on a loopback S3 server (GETs counted at the server) while a nemesis
kills and freezes workers (modes ``kills``, ``both``) and a worker plugin holds back some
of the cache's invalidations and peer replies (modes ``slow``, ``both``).  Afterwards, once
the cluster settled, the client writes every chunk once more, then every worker reads
every chunk twice: each must see the last written version, and the source must be read
at most once per chunk.  The history is checked by
:func:`benchmarks._chaos_history.check`; exit status 0 when it found nothing, 1 when it
found something, 2 when the run itself could not be carried out.

Stall bounds: a cache read waits for a frozen index host or peer at most
``zarr-cache.read-timeout`` (5 s), and a read task makes two (the array's metadata, then
its chunk): 12 s.  A write may legitimately wait for a frozen worker's lease
(``zarr-cache.write-lease`` 10 s x 1.1 + 0.5 s) behind one batch of its own process: 20 s,
and 11.5 s more for each further worker frozen during it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np

from benchmarks._chaos_cluster import CHECKOUT, ProcessCluster
from benchmarks._chaos_delays import (
    INVALIDATE_HANDLER,
    PEER_GET_HANDLER,
    ChaosDelays,
    read_delay_logs,
)
from benchmarks._chaos_history import (
    History,
    NemesisEvent,
    ReadOp,
    Report,
    WriteOp,
    check,
    encode,
)
from benchmarks._chaos_nemesis import Nemesis
from benchmarks._chaos_tasks import StackDumps, dump_stacks, read_chunks
from benchmarks._chaos_workload import Workload, WorkloadSettings
from dask_zarr_cache.core.config import CacheSettings
from dask_zarr_cache.core.names import EXTENSION_NAME

__all__ = ["main", "run"]

#: A read task makes two cache reads (the array's metadata, then its chunk), each of which
#: waits for frozen hosts at most zarr-cache.read-timeout (5 s).
DEFAULT_READ_STALL_BOUND = 12.0
#: A write waits for a frozen worker's lease (10 s) at most 11.5 s, behind at most one
#: batch of the same process (see ``check``'s ``lease_wait`` for more frozen workers).
DEFAULT_WRITE_STALL_BOUND = 20.0
#: How long a write waits for one unreachable worker, as the cache computes it (the run
#: keeps the default write-lease).
LEASE_WAIT = CacheSettings(max_size=1).write_wait
CHUNK_SIZE = 256
BUCKET = "chaos"
URL = f"s3://{BUCKET}/data.zarr"
#: Seconds the run may take beyond ``--seconds`` (setup, drain, final phase); the teardown
#: takes ~10 s more, so a run ends within ``--seconds`` + 90 s.
OVERHEAD = 80.0
#: Seconds operations in flight may take to finish once the chaos ends.
DRAIN = 35.0
#: Seconds any one call to the cluster may take.
CALL_TIMEOUT = 15.0


class HarnessError(RuntimeError):
    """The run could not be carried out (not a finding about the cache)."""


class Deadline:
    """Seconds left until a fixed point in time."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """Seconds left, at most ``cap``; raises if none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise HarnessError("the run's time budget is spent")
        return min(cap, left)


def _wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until true; each call must itself be bounded (``CALL_TIMEOUT``)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as err:  # the cluster may be in flux
            last = err
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what} ({last!r})")


def cache_stats(client: Any) -> dict[str, Any]:
    """``cluster_stats(client)`` within :data:`CALL_TIMEOUT` (a hung worker must not hang us).

    Raises
    ------
    HarnessError
        If the scheduler does not answer in time, or the cache is not installed.

    """
    try:
        stats = client.sync(
            client.scheduler.zarr_cache_cluster_stats, callback_timeout=CALL_TIMEOUT
        )
    except TimeoutError as err:
        raise HarnessError(
            f"zarr_cache_cluster_stats did not answer within {CALL_TIMEOUT} s"
        ) from err
    if not isinstance(stats, dict):
        raise HarnessError("the cache's scheduler plugin is not installed")
    return stats


def _cache_everywhere(client: Any, n: int) -> bool:
    running = set(client.scheduler_info(n_workers=-1)["workers"])
    cached = set(cache_stats(client)["workers"])
    return len(running) == n and running == cached


async def _settled(dask_worker: Any) -> bool:
    """Whether this worker's cache recovered: caught up, serving, registered, idle."""
    cache = dask_worker.extensions.get(EXTENSION_NAME)
    if cache is None:
        return False
    await asyncio.wait_for(cache.idle(), CALL_TIMEOUT)  # commits and abandons sent
    return cache.state.epoch is not None and cache.state.can_serve() and cache.index.connected


def _recovered(client: Any, n: int) -> bool:
    """Every worker has a cache that recovered from the chaos (see :func:`_settled`).

    A worker restarted or unfrozen just before this is still catching up, or registering
    its files with the index: until then a chunk may be read again, which is what a
    failure costs (docs/failure-model.md), not what the final phase measures.
    """
    if not _cache_everywhere(client, n):
        return False
    return all(client.run(_settled, callback_timeout=CALL_TIMEOUT).values())


def _handlers_wrapped(dask_worker: Any) -> bool:
    return all(
        hasattr(dask_worker.handlers.get(name), "__chaos_wrapped__")
        for name in (INVALIDATE_HANDLER, PEER_GET_HANDLER)
    )


def _package_file() -> str:
    import dask_zarr_cache

    return dask_zarr_cache.__file__


def chunk_gets(counts: Counter[str], chunks: int) -> dict[int, int]:
    """GETs per chunk object of the array in the server's per-object counts.

    Parameters
    ----------
    counts : Counter
        GETs per ``"<bucket>/<key>"`` (``LocalS3Server.object_gets``, or a difference).
    chunks : int
        Chunks of the array.

    Returns
    -------
    dict
        GETs per chunk number.

    """
    prefix = URL.removeprefix("s3://") + "/c/"
    return {c: counts.get(f"{prefix}{c}", 0) for c in range(chunks)}


def _write_initial(s3: Any, chunks: int) -> list[WriteOp]:
    import zarr
    from zarr.storage import FsspecStore

    s3.create_bucket(BUCKET)
    store = FsspecStore.from_url(URL, storage_options=s3.storage_options)
    arr = zarr.create_array(
        store, shape=(chunks * CHUNK_SIZE,), chunks=(CHUNK_SIZE,), dtype="int64"
    )
    t_invoke = time.time()
    arr[...] = np.repeat([encode(c, 1) for c in range(chunks)], CHUNK_SIZE).astype("int64")
    t_return = time.time()
    return [WriteOp(c, 1, t_invoke, t_return, "initial", None, "ok") for c in range(chunks)]


def _final_phase(
    client: Any, args: argparse.Namespace, storage_options: dict[str, Any], deadline: Deadline
) -> list[ReadOp]:
    """Every worker reads every chunk, twice (after the final writes); the reads, recorded."""
    reads = []
    rng = random.Random(f"{args.seed}:final")
    for _ in range(2):
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        futures = {}
        for address in workers:
            order = rng.sample(range(args.chunks), args.chunks)
            futures[address] = client.submit(
                read_chunks,
                URL,
                storage_options,
                order,
                CHUNK_SIZE,
                workers=[address],
                allow_other_workers=False,
                pure=False,
            )
        for address, future in futures.items():
            t_submit = time.time()
            try:
                records = future.result(timeout=deadline.left(60))
            except Exception as err:
                error = f"{type(err).__name__}: {err}"[:500]
                reads.append(
                    ReadOp(-1, None, False, t_submit, time.time(), address, error, phase="final")
                )
                continue
            reads += [ReadOp(**r, phase="final") for r in records]
    return reads


def run(args: argparse.Namespace) -> tuple[Report, dict[str, Any]]:
    """Carry out one chaos run; returns the checker's report and facts of the run.

    Parameters
    ----------
    args : argparse.Namespace
        The command line (:func:`parse_args`).

    Returns
    -------
    report : Report
        What the checker found (plus ``recovery``: the cluster did not come back).
    facts : dict
        Facts of the run (phase times, GETs, counters) and the ``history``.

    Raises
    ------
    HarnessError
        If the run could not be carried out (the cluster did not start, the time ran out).

    """
    from distributed import Client

    from dask_zarr_cache import ClusterCacheStore
    from dask_zarr_cache.testing import LocalS3Server

    deadline = Deadline(args.seconds + OVERHEAD)
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    facts: dict[str, Any] = {"seed": args.seed, "mode": args.mode, "args": vars(args)}
    facts["phase_seconds"] = phases
    report: Report | None = None
    with tempfile.TemporaryDirectory(prefix="dzc-chaos-") as tmp, LocalS3Server() as s3:
        initial = _write_initial(s3, args.chunks)
        storage_options = dict(s3.storage_options)
        env = {
            "DASK_ZARR_CACHE__DIRECTORY": os.path.join(tmp, "cache"),
            "DASK_ZARR_CACHE__MAX_SIZE": "1GiB",
            "DASK_ZARR_CACHE__FLUSH_INTERVAL": "100ms",
        }
        cluster = ProcessCluster(tmp, env)
        nemesis: Nemesis | None = None
        workload: Workload | None = None
        client = None
        hung = True  # until the cluster is known to have come back
        try:
            cluster.start_scheduler()
            for n in range(args.workers):
                cluster.start_worker(f"w{n}")
            client = Client(cluster.address, timeout=deadline.left(60))
            client.wait_for_workers(args.workers, timeout=deadline.left(90))
            _wait_until(
                lambda: _cache_everywhere(client, args.workers),
                deadline.left(60),
                "the cache on every worker",
            )
            files = set(client.run(_package_file, callback_timeout=CALL_TIMEOUT).values())
            facts["worker_package"] = sorted(files)
            if not all(f.startswith(CHECKOUT + os.sep) for f in files):
                raise HarnessError(f"workers import dask_zarr_cache from {files}, not {CHECKOUT}")
            client.register_plugin(StackDumps(os.path.join(tmp, "logs")))
            delays_dir = os.path.join(tmp, "delays")
            if args.mode in ("slow", "both"):
                delays = ChaosDelays(
                    args.seed,
                    invalidate_fraction=args.invalidate_fraction,
                    peer_fraction=args.peer_fraction,
                    log_dir=delays_dir,
                )
                client.register_plugin(delays)  # after the cache's plugin: see _chaos_delays
                _wait_until(
                    lambda: all(
                        client.run(_handlers_wrapped, callback_timeout=CALL_TIMEOUT).values()
                    ),
                    10,
                    "the delays on every worker",
                )
            client_array = _open_client_array(ClusterCacheStore, storage_options)
            settings = WorkloadSettings(chunks=args.chunks, chunk_size=CHUNK_SIZE)
            workload = Workload(client, URL, storage_options, client_array, settings, args.seed)
            actions = None if args.mode in ("kills", "both") else {}
            nemesis = Nemesis(client, cluster.nanny_pids, args.seed, actions=actions)
            phases["setup"] = round(time.monotonic() - t0, 1)

            gets_before = s3.object_gets
            workload.start()
            nemesis.start()
            time.sleep(min(args.seconds, deadline.left(args.seconds)))
            nemesis.stop()
            phases["chaos"] = round(time.monotonic() - t0 - phases["setup"], 1)
            abandoned = workload.stop(drain=min(DRAIN, deadline.left(DRAIN)))
            phases["drain"] = round(time.monotonic() - t0 - sum(phases.values()), 1)
            facts["abandoned_after_drain"] = abandoned
            facts["chaos_chunk_gets"] = sum(
                chunk_gets(s3.object_gets - gets_before, args.chunks).values()
            )

            recovered = True
            try:
                _wait_until(
                    lambda: _recovered(client, args.workers),
                    deadline.left(60),
                    f"{args.workers} workers whose cache recovered after the chaos",
                )
            except HarnessError as err:
                recovered = False
                facts["recovery_error"] = str(err)
            phases["recovery"] = round(time.monotonic() - t0 - sum(phases.values()), 1)
            final: list[ReadOp] = []
            final_gets = None
            if recovered:
                # A peer that failed in the chaos is skipped for read-timeout (5 s), then
                # asked again: the final phase starts once that has passed.
                time.sleep(5.5)
                # As the field sees it: one more write per chunk, then the reads.
                facts["final_writes"] = workload.write_every_chunk()
                before, counters = s3.object_gets, _worker_counters(client)
                final = _final_phase(client, args, storage_options, deadline)
                final_gets = chunk_gets(s3.object_gets - before, args.chunks)
                facts["final_counters"] = _counter_changes(counters, _worker_counters(client))
                facts["cache_counters"] = _counters(client)
                facts["index"] = _index_layout(client)
                phases["final"] = round(time.monotonic() - t0 - sum(phases.values()), 1)
            hung = not recovered or abandoned > 0
            delays = read_delay_logs(delays_dir)
            events = list(nemesis.events) + [
                NemesisEvent(d["kind"], d["worker"], d["t_start"], d["t_end"]) for d in delays
            ]
            history = History(workload.reads + final, initial + workload.writes, events, final_gets)
            report = check(history, args.read_stall_bound, args.write_stall_bound, LEASE_WAIT)
            report.failures["recovery"] = 0 if recovered else 1
            facts["final_gets"] = final_gets
            facts["history"] = history
            return report, facts
        finally:
            if nemesis is not None:
                nemesis.stop(timeout=5)
            if workload is not None:
                workload.stop(drain=0)
            if hung:
                facts["source_get_seconds"] = _source_probe(s3, args.chunks)
            if report is None or not report.ok:
                facts["logs"] = _keep_logs(tmp, cluster, args, stacks=hung)
            if client is not None:
                try:
                    client.close(timeout=10)
                except Exception as err:  # closing must not hide the run's outcome
                    print(f"(closing the client: {err!r})", file=sys.stderr)
            cluster.close()


def _keep_logs(tmp: str, cluster: ProcessCluster, args: argparse.Namespace, stacks: bool) -> str:
    """Copy the processes' logs (and, if something hung, every worker's stacks) out of ``tmp``."""
    logs = os.path.join(tmp, "logs")
    if stacks:  # two samples, 2 s apart: what stays put is what hangs
        nannies = set(cluster.nanny_pids())
        for _ in range(2):
            dump_stacks(logs, lambda pid: _parent_of(pid) in nannies)
            time.sleep(2.0)
    kept = os.path.join(tempfile.gettempdir(), f"dzc-chaos-{args.mode}-{args.seed}-logs")
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(logs, kept, dirs_exist_ok=True)
    delays = os.path.join(tmp, "delays")
    if os.path.isdir(delays):
        shutil.copytree(delays, os.path.join(kept, "delays"), dirs_exist_ok=True)
    return kept


def _source_probe(s3: Any, chunks: int) -> float | None:
    """Seconds one GET of a chunk takes from here now (``None``: none in 10 s): is S3 alive?"""
    import threading

    took: list[float] = []

    def get() -> None:
        start = time.monotonic()
        s3.filesystem().cat(f"{URL.removeprefix('s3://')}/c/{chunks - 1}")
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    thread.join(10)
    return round(took[0], 3) if took else None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _counters(client: Any) -> dict[str, int] | None:
    """The cache's counters summed over the workers (since each worker's last start)."""
    try:
        total = cache_stats(client)["total"]
    except Exception:
        return None
    keep = ("hits", "misses", "peer_reads", "peer_served", "remote_reads", "fallbacks")
    return {k: total[k] for k in keep if k in total}


def _index_layout(client: Any) -> list[str | None] | None:
    """Per index shard, the name of its host (``None``: no index shard there now)."""
    try:
        layout = client.sync(client.scheduler.zarr_cache_index, callback_timeout=CALL_TIMEOUT)
        names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
    except Exception:
        return None
    return [None if loc is None else names.get(loc["address"], loc["address"]) for loc in layout]


def _worker_counters(client: Any) -> dict[str, dict[str, int]]:
    try:
        return cache_stats(client)["workers"]
    except Exception:
        return {}


def _counter_changes(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Per worker, the counters that changed (the final phase's reads, by path)."""
    keep = ("hits", "peer_reads", "peer_served", "remote_reads", "fallbacks")
    return {
        address: {k: now[k] - before.get(address, {}).get(k, 0) for k in keep if k in now}
        for address, now in sorted(after.items())
    }


def _open_client_array(store_class: Any, storage_options: dict[str, Any]) -> Any:
    import zarr
    from zarr.storage import FsspecStore

    source = FsspecStore.from_url(URL, storage_options=storage_options, read_only=False)
    return zarr.open_array(store_class(source), mode="r+")


def summary(report: Report, facts: dict[str, Any], args: argparse.Namespace) -> str:
    """The human-readable summary of a run.

    Parameters
    ----------
    report : Report
        What the checker found.
    facts : dict
        Facts of the run (from :func:`run`).
    args : argparse.Namespace
        The command line.

    Returns
    -------
    str
        Lines: counts of operations and nemesis actions, GETs, each failure kind, the
        first examples, and how to reproduce.

    """
    s, f = report.stats, report.failures
    writes = max(s["writes"], 1)
    final_gets = facts.get("final_gets") or {}
    most = max(final_gets.values(), default=0)
    lines = [
        f"chaos seed {args.seed}, mode {args.mode}: {args.seconds:g} s of chaos, "
        f"{args.workers} workers, {args.chunks} chunks",
        f"reads {s['reads']} ({s['reads_completed']} with a value), final-phase reads "
        f"{s['final_reads']}",
        f"writes {s['writes']} (client {s['client_writes']}, task {s['task_writes']}; "
        f"outcomes {s['write_outcomes']})",
        f"kills {s['kills']} {s['kills_by_kind']}, stops {s['stops']}, nemesis errors "
        f"{s['nemesis_errors']}",
        f"delayed invalidations {s['delayed_invalidations']}, delayed peer replies "
        f"{s['delayed_peer_replies']}",
        f"S3 chunk GETs during the chaos: {facts.get('chaos_chunk_gets')} "
        f"({facts.get('chaos_chunk_gets', 0) / writes:.2f} per write); final phase: "
        f"{sum(final_gets.values())} for {len(final_gets)} chunks, at most {most} per chunk",
        f"stale reads: {f['stale_reads']}",
        f"values never written: {f['never_written']}",
        f"torn reads: {f['torn_reads']}",
        f"reads over {args.read_stall_bound} s: {f['read_stalls']} {s['read_stalls_by_cause']} "
        f"(worst {s['worst_reads']}; {s['reads_over_2s']} over 2 s, of them on a worker "
        f"not frozen itself, by what was near: {s['reads_over_2s_not_frozen_by_cause']})",
        f"writes over {args.write_stall_bound} s: {f['write_stalls']} "
        f"{s['write_stalls_by_cause']} (worst {s['worst_writes']})",
        f"cache-caused errors: {f['cache_errors']}",
        f"final phase read-once violations: {f['final_read_once']}",
        f"cache counters (since each worker's last start): {facts.get('cache_counters')}; "
        f"index shards at the end on: {facts.get('index')}",
        f"final phase, per worker: {facts.get('final_counters')}",
    ]
    lines.append(
        f"phases (s): {facts.get('phase_seconds')}; abandoned after the drain: "
        f"{facts.get('abandoned_after_drain')}"
    )
    if "source_get_seconds" in facts:
        lines.append(
            f"something hung; one GET at the S3 server from the runner just took "
            f"{facts['source_get_seconds']} s (None: no answer in 10 s)"
        )
    if f.get("recovery"):
        lines.append(f"RECOVERY FAILED: {facts.get('recovery_error')}")
    if facts.get("logs"):
        lines.append(f"process logs (and stacks, if something hung): {facts['logs']}")
    for kind, ops in report.examples.items():
        lines.append(f"-- first {kind} ({f[kind]} in all):")
        lines += [f"   {_brief(op)}" for op in ops[:5]]
    lines.append("RESULT: " + ("OK" if report.ok else "FAILURES FOUND"))
    lines.append(f"reproduce: {_command(args)}")
    return "\n".join(lines)


def _brief(op: dict[str, Any]) -> str:
    keep = (
        "op",
        "chunk",
        "version",
        "value",
        "worker",
        "duration",
        "saw",
        "expected_at_least",
        "started_after",
        "decoded",
        "error",
        "outcome",
        "cause",
        "nemesis",
        "gets",
        "phase",
    )
    return ", ".join(f"{k}={op[k]}" for k in keep if op.get(k) not in (None, [], ""))


def _command(args: argparse.Namespace) -> str:
    return (
        f"python -m benchmarks.chaos --seed {args.seed} --mode {args.mode} "
        f"--seconds {args.seconds:g} --workers {args.workers} --chunks {args.chunks}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring); a random seed if none is given.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The arguments, ``seed`` always set.

    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--mode", choices=("kills", "slow", "both"), default="both")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--read-stall-bound", type=float, default=DEFAULT_READ_STALL_BOUND)
    parser.add_argument("--write-stall-bound", type=float, default=DEFAULT_WRITE_STALL_BOUND)
    parser.add_argument(
        "--invalidate-fraction",
        type=float,
        default=0.15,
        help="share of invalidations held back 20-300 ms (slow, both)",
    )
    parser.add_argument(
        "--peer-fraction",
        type=float,
        default=0.15,
        help="share of peer replies held back 50-500 ms (slow, both)",
    )
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--history", default=None, help="write every operation here (JSON)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the chaos suite and print its summary.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 if the checker found nothing, 1 if it found something, 2 if the
        run could not be carried out.

    """
    args = parse_args(argv)
    print(
        f"chaos seed {args.seed} (reproduce with --seed {args.seed}): {_command(args)}", flush=True
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report, facts = run(args)
    except (HarnessError, KeyboardInterrupt) as err:
        print(f"chaos run did not complete: {err!r}", flush=True)
        return 2
    except Exception:
        traceback.print_exc()
        print("chaos run did not complete (error above)", flush=True)
        return 2
    history = facts.pop("history")
    print(summary(report, facts, args), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report.as_dict(), "run": facts}, f, indent=1, default=str)
    if args.history:
        with open(args.history, "w") as f:
            json.dump(asdict(history), f, default=str)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
