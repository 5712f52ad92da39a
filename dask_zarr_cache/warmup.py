"""``warm``: fetch a dataset (or part of it) into the cluster cache before it is read.

The objects to fetch are listed on the client from the source's metadata (arrays of a
group, or one array; optionally some variables and an index range per dimension), their
sizes from one listing of the source. Objects the index already knows are skipped. The
rest are spread over the workers by free budget, in tasks pinned to them; each worker
reads at most ``concurrency`` objects at a time from the source, whatever its threads.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zarr
from distributed import as_completed
from zarr.core.buffer import default_buffer_prototype

from dask_zarr_cache.client import cached_keys, cluster_stats
from dask_zarr_cache.core.clock import monotonic_clock
from dask_zarr_cache.core.exceptions import ZarrCacheError
from dask_zarr_cache.core.names import WARM_METADATA
from dask_zarr_cache.datasets import object_sizes
from dask_zarr_cache.scheduler.locality import HashRing

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from distributed import Client

    from dask_zarr_cache.store import ClusterCacheStore

__all__ = ["WarmJob", "WarmReport", "warm"]

#: Objects per task: small enough for a steady progress bar, large enough to be cheap.
CANCEL_JOIN = 10.0  # seconds cancel() waits for the progress thread to end
BATCH = 32


@dataclass(frozen=True)
class WarmReport:
    """What :func:`warm` did."""

    chunks: int  #: objects fetched into the cache now
    bytes: int  #: their size at the source
    gets: int  #: source reads the cluster made meanwhile (cluster-wide counter)
    seconds: float
    skipped: int  #: objects that were cached already
    left_out: int  #: objects that did not fit the free budget (``fit="trim"``)
    cancelled: bool = False  #: stopped by :meth:`WarmJob.cancel` or Ctrl-C

    def __str__(self) -> str:
        return (
            f"warmed {self.chunks} objects ({self.bytes / 2**20:.1f} MiB) in "
            f"{self.seconds:.1f} s with {self.gets} GETs; {self.skipped} already cached"
            + (f"; {self.left_out} left out (over the free budget)" if self.left_out else "")
            + ("; cancelled" if self.cancelled else "")
        )


def warm(
    client: Client,
    store: ClusterCacheStore,
    variables: Sequence[str] | None = None,
    selection: Mapping[str, slice] | None = None,
    *,
    concurrency: int = 8,
    fit: str = "refuse",
    progress: bool = True,
    wait: bool = True,
) -> WarmReport | WarmJob:
    """Fetch the objects of ``store`` (or some of them) into the cluster cache.

    Parameters
    ----------
    client : distributed.Client
        A client of a cluster with :class:`~dask_zarr_cache.ZarrCachePlugin`.
    store : ClusterCacheStore
        The data, rooted at a group or an array.
    variables : list of str, optional
        Names (or paths) of the arrays to warm; default all.
    selection : dict, optional
        Index range per dimension name, e.g. ``{"time": slice(0, 24)}``; arrays without
        that dimension are warmed whole.
    concurrency : int
        Source reads in flight per worker at most.
    fit : {"refuse", "trim"}
        When the objects do not fit the cluster's free budget: raise, or warm what fits
        (in order) and report the rest as ``left_out``.
    progress : bool
        Show a progress bar (terminal or Jupyter).
    wait : bool
        Wait for the end and return a :class:`WarmReport`; with ``False``, return a
        :class:`WarmJob` at once (``.result()``, ``.cancel()``, ``.done()``).

    Raises
    ------
    ZarrCacheError
        If the plugin is not registered, or (``fit="refuse"``) the objects do not fit.

    """
    if fit not in ("refuse", "trim") or concurrency < 1:
        raise ValueError("fit must be 'refuse' or 'trim' and concurrency at least 1")
    start = time.perf_counter()
    stats = cluster_stats(client)
    # Objects the cache does not name (in-memory metadata, inlined chunks) are read
    # through anyway: nothing to warm.
    sizes, ckeys = {}, {}
    for key, size in object_sizes(store, variables, selection).items():
        ckey = store.cache_key(key)
        if ckey is not None:
            sizes[key], ckeys[key] = size, ckey
    cached = cached_keys(client, list(ckeys.values()))
    todo = {k: n for (k, n), hit in zip(sizes.items(), cached, strict=True) if not hit}
    free = {addr: max(0, w["capacity"] - w["bytes"]) for addr, w in stats["workers"].items()}
    ring = HashRing(stats["workers"])
    homes = {k: ring.home(ckeys[k]) for k in todo}
    plan, left_out = _spread(todo, free, homes)
    if left_out and fit == "refuse":
        raise ZarrCacheError(
            f"the selection needs {sum(todo.values()) / 2**20:.1f} MiB but the cluster's "
            f"caches have {sum(free.values()) / 2**20:.1f} MiB free; warm fewer variables or "
            "a smaller selection, or pass fit='trim' to warm what fits"
        )
    batches = {
        client.submit(_fetch, store, batch, concurrency, workers=[addr], pure=False): batch
        for addr, keys in plan.items()
        for batch in (keys[i : i + BATCH] for i in range(0, len(keys), BATCH))
    }
    planned = sum(todo[k] for keys in plan.values() for k in keys)
    meter = _Progress(client, len(todo) - len(left_out), planned, progress)
    job = WarmJob(client, batches, todo, meter)
    job.report = {
        "bytes": planned,
        "skipped": len(sizes) - len(todo),
        "left_out": len(left_out),
        "start": start,
        "remote_reads": stats["total"]["remote_reads"],
    }
    if not wait:
        return job
    try:
        return job.result()
    except BaseException:
        job.cancel()  # Ctrl-C: running reads finish and are kept, no more start
        raise


class WarmJob:
    """A warm-up running in the background (``warm(..., wait=False)``).

    :meth:`result` waits for its :class:`WarmReport`; :meth:`cancel` stops it promptly:
    batches not started never start, running ones finish and stay cached, so disks and
    index stay consistent.
    """

    def __init__(
        self, client: Client, batches: dict[Any, list[str]], sizes: dict[str, int], meter: Any
    ) -> None:
        self.client, self._batches, self._sizes, self._meter = client, batches, sizes, meter
        self.report: dict[str, Any] = {}
        self.fetched = 0
        self.cancelled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zarr-cache-warm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for future in as_completed(self._batches):
                if future.cancelled():
                    continue
                self.fetched += future.result()
                self._meter.advance(self._batches[future], self._sizes)
        except BaseException as err:
            self._error = err
        finally:
            try:
                self._meter.close()
            except BaseException as err:  # the client closed under it (Ctrl-C)
                self._error = self._error or err

    def done(self) -> bool:
        """Whether it has finished (or was cancelled and has stopped)."""
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop starting new batches; those already running finish."""
        self.cancelled = True
        self.client.cancel(list(self._batches))
        # The thread publishes "finished" through the client: let it, before a caller
        # (the CLI on Ctrl-C) closes the client.
        self._thread.join(CANCEL_JOIN)

    def result(self, timeout: float | None = None) -> WarmReport:
        """Wait for the warm-up to end and return what it did.

        Raises
        ------
        TimeoutError
            If it did not end within ``timeout`` seconds.

        """
        deadline = None if timeout is None else monotonic_clock() + timeout
        while self._thread.is_alive():  # short joins: Ctrl-C stays responsive
            if deadline is not None and monotonic_clock() > deadline:
                raise TimeoutError("the warm-up is still running")
            self._thread.join(0.2)
        if self._error is not None and not self.cancelled:
            raise self._error
        after = cluster_stats(self.client)["total"]
        return WarmReport(
            chunks=self.fetched,
            bytes=self.report["bytes"],
            gets=after["remote_reads"] - self.report["remote_reads"],
            seconds=time.perf_counter() - self.report["start"],
            skipped=self.report["skipped"],
            left_out=self.report["left_out"],
            cancelled=self.cancelled,
        )


class _Progress:
    """A progress line on stderr (terminal or Jupyter) and in the scheduler's metadata."""

    def __init__(self, client: Client, total: int, nbytes: int, show: bool) -> None:
        self.client, self.show = client, show
        self.state = {"done": 0, "total": total, "bytes_done": 0, "bytes_total": nbytes}
        self._publish(finished=False)

    def advance(self, keys: Sequence[str], sizes: Mapping[str, int]) -> None:
        self.state["done"] += len(keys)
        self.state["bytes_done"] += sum(sizes[k] for k in keys)
        self._publish(finished=False)

    def close(self) -> None:
        self._publish(finished=True)
        if self.show:
            print(file=sys.stderr)

    def _publish(self, finished: bool) -> None:
        self.client.set_metadata(list(WARM_METADATA), {**self.state, "finished": finished})
        if self.show:
            done, total = self.state["done"], max(self.state["total"], 1)
            bar = "#" * (30 * done // total)
            print(
                f"\rwarming [{bar:<30}] {done}/{self.state['total']} objects, "
                f"{self.state['bytes_done'] / 2**20:.1f}/"
                f"{self.state['bytes_total'] / 2**20:.1f} MiB",
                end="",
                file=sys.stderr,
                flush=True,
            )


def _spread(
    sizes: dict[str, int], free: dict[str, int], homes: dict[str, str | None]
) -> tuple[dict[str, list[str]], list[str]]:
    """Give each object to its home or, without room there, to the freest worker.

    The home is where locality will run the reads of the object; objects no worker has
    room for are left out.
    """
    plan: dict[str, list[str]] = {addr: [] for addr in free}
    room = dict(free)
    left_out = []
    for key, size in sizes.items():
        addr = homes.get(key)
        if addr not in room or room[addr] < size:
            addr = max(room, key=room.__getitem__, default=None)
        if addr is None or room[addr] < size:
            left_out.append(key)
            continue
        plan[addr].append(key)
        room[addr] -= size
    return {a: keys for a, keys in plan.items() if keys}, left_out


def _fetch(store: ClusterCacheStore, keys: Sequence[str], concurrency: int) -> int:
    """Read ``keys`` through the cache on this worker (a task); returns how many exist."""

    async def fetch_all() -> int:
        limit = _worker_limit(concurrency)

        async def one(key: str) -> bool:
            async with limit:
                return await store.get(key, default_buffer_prototype()) is not None

        return sum(await asyncio.gather(*(one(k) for k in keys)))

    return zarr.core.sync.sync(fetch_all())


_limits: dict[tuple[int, int], asyncio.Semaphore] = {}


def _worker_limit(concurrency: int) -> asyncio.Semaphore:
    """One semaphore per process (and zarr loop): every task of the worker shares it."""
    key = (os.getpid(), concurrency)
    if key not in _limits:
        _limits[key] = asyncio.Semaphore(concurrency)
    return _limits[key]
