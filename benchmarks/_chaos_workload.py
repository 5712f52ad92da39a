"""The chaos suite's workload: writers and readers on a real cluster, recording a history.

- **Writers** (one per chunk at a time, so each chunk's versions only grow): client
  threads writing through a ``ClusterCacheStore`` in this process, and threads submitting
  write tasks to random workers.  A write's invoke time is taken here before it is
  submitted; its return time right after the store write returned (in the task, or here).
  A write task runs at most once (Dask re-runs a task whose result died with its worker);
  a re-run writes nothing and makes the write's outcome "maybe".
- **Readers**: one-chunk read tasks pinned (loosely) to a worker, at most
  ``max_reads_in_flight`` at a time, each recorded when it is done; times are taken inside
  the task.  *Random* readers pick a chunk and a worker at random (part of them twice in a
  row, a moment apart, ``pair_share``).  The *hot* reader follows the writes: every few
  tens of milliseconds it sends a wave of reads of each chunk being written (or written
  within ``hot_after``) to every worker.  Most of those reads are on workers that do not
  own the chunk and go through owner hints, they overlap the write's invalidations, and
  reads on one worker join each other's fetches: how a late invalidation or a slow peer
  reply becomes a stale read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks._chaos_history import ReadOp, WriteOp, encode
from benchmarks._chaos_tasks import chunk_selection, read_chunk, write_chunk

if TYPE_CHECKING:
    from distributed import Client, Future

__all__ = ["Workload", "WorkloadSettings"]


@dataclass(frozen=True)
class WorkloadSettings:
    """How hard the workload pushes (defaults keep a 2-core machine busy, not saturated)."""

    chunks: int = 32
    chunk_size: int = 256
    #: Random readers (threads), and read tasks in flight at most (all readers together).
    readers: int = 1
    max_reads_in_flight: int = 40
    client_writers: int = 2
    task_writers: int = 2
    #: Share of random reads followed by a second read of that chunk on that worker, and
    #: the seconds between the two (uniform bounds).
    pair_share: float = 0.3
    pair_gap: tuple[float, float] = (0.01, 0.12)
    #: Pause of a random reader after each read (uniform bounds).
    read_pause: tuple[float, float] = (0.02, 0.08)
    #: Seconds between the hot reader's waves, and after a write returned during which its
    #: chunk is still read in waves.
    hot_gap: float = 0.03
    hot_after: float = 0.25
    #: Pause of a writer after each write (uniform bounds).
    write_pause: tuple[float, float] = (0.1, 0.5)
    #: Seconds to wait for one write before giving up on it (then: outcome "maybe").
    op_timeout: float = 60.0


class Workload:
    """Readers and writers on the cluster of ``client``; see the module docstring.

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster (also the cluster writes through ``client_array`` announce to).
    url, storage_options : str, dict
        The array at the source, as the tasks open it.
    client_array : zarr.Array
        The array opened here through a ``ClusterCacheStore`` (``mode="r+"``).
    settings : WorkloadSettings
        Rates and shares.
    seed : int
        Seed of the run.

    """

    def __init__(
        self,
        client: Client,
        url: str,
        storage_options: dict[str, Any],
        client_array: Any,
        settings: WorkloadSettings,
        seed: int,
    ) -> None:
        self.client = client
        self.url = url
        self.storage_options = storage_options
        self.client_array = client_array
        self.settings = settings
        self.seed = seed
        self.reads: list[ReadOp] = []
        self.writes: list[WriteOp] = []
        self._lock = threading.Lock()
        self._versions = dict.fromkeys(range(settings.chunks), 1)
        self._busy: set[int] = set()
        self._poisoned: set[int] = set()  # a write that never answered: never write it again
        self._writing: dict[int, float] = {}  # chunk -> when its write started
        self._written: dict[int, float] = {}  # chunk -> when its last write returned
        self._members: list[tuple[str, str]] = []
        self._slots = threading.BoundedSemaphore(settings.max_reads_in_flight)
        self._pending: dict[str, tuple[Future, int, str, float]] = {}
        self._stop = threading.Event()
        self._give_up_at = float("inf")  # once stopping: when waiting ops are abandoned
        self._threads: list[threading.Thread] = []
        #: Where finished reads' results are gathered: not on Dask's one callback thread,
        #: where a gather that waits for a lost result to be computed again held every
        #: other callback (the slots of all reads, the writes' completions) for 28 s
        #: (chaos seed 6004).
        self._collector = concurrent.futures.ThreadPoolExecutor(4, "chaos-collect")
        #: Where write tasks claim their first run (see ``write_chunk``).
        self._claims = tempfile.mkdtemp(prefix="dzc-chaos-claims-")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads (daemon threads: they never keep the process alive)."""
        s = self.settings
        self._refresh_members()
        roles = [("members", self._watch_members, 0), ("hot-reader", self._hot_reader, 0)]
        roles += [("reader", self._reader, i) for i in range(s.readers)]
        roles += [("client-writer", self._client_writer, i) for i in range(s.client_writers)]
        roles += [("task-writer", self._task_writer, i) for i in range(s.task_writers)]
        for role, target, i in roles:
            rng = random.Random(f"{self.seed}:{role}:{i}")
            thread = threading.Thread(target=target, args=(rng,), name=f"{role}-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, drain: float) -> int:
        """Stop issuing operations; wait ``drain`` seconds at most for those in flight.

        Parameters
        ----------
        drain : float
            Seconds operations in flight may still take.

        Returns
        -------
        int
            Operations still in flight then (recorded as not completed), plus threads that
            did not end.

        """
        self._give_up_at = time.monotonic() + drain
        self._stop.set()
        for thread in self._threads:
            thread.join(max(0.0, self._give_up_at - time.monotonic()) + 2.0)
        while self._pending and time.monotonic() < self._give_up_at:
            time.sleep(0.1)
        with self._lock:
            abandoned, self._pending = list(self._pending.values()), {}
        self._collector.shutdown(wait=False, cancel_futures=True)
        now = time.time()
        for future, chunk, name, t_submit in abandoned:
            future.cancel()
            self.reads.append(ReadOp(chunk, None, False, t_submit, now, name, completed=False))
        shutil.rmtree(self._claims, ignore_errors=True)
        return len(abandoned) + sum(t.is_alive() for t in self._threads)

    # -- choices -------------------------------------------------------------------------------
    def _watch_members(self, rng: random.Random) -> None:
        while not self._stop.wait(0.5):
            try:
                self._refresh_members()
            except Exception:  # the next round tries again
                continue

    def _refresh_members(self) -> None:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        self._members = sorted((a, str(w["name"])) for a, w in info.items())

    def _pick_worker(self, rng: random.Random) -> tuple[str, str] | None:
        members = self._members
        return rng.choice(members) if members else None

    def _hot_chunks(self) -> list[int]:
        """Chunks being written, or written within ``hot_after`` seconds."""
        now = time.time()
        with self._lock:
            hot = set(self._writing)
            hot.update(c for c, t in self._written.items() if now - t < self.settings.hot_after)
        return sorted(hot)

    def _claim(self, rng: random.Random, chunk: int | None = None) -> tuple[int, int] | None:
        """A chunk no one writes now (``chunk``, if free), and its next version.

        The caller must release it.
        """
        with self._lock:
            free = [c for c in range(self.settings.chunks) if c not in self._busy]
            if chunk is not None:
                free = [chunk] if chunk in free else []
            if not free:
                return None
            chunk = rng.choice(free)
            self._busy.add(chunk)
            self._versions[chunk] += 1
            self._writing[chunk] = time.time()
            return chunk, self._versions[chunk]

    def _release(self, chunk: int, poisoned: bool = False) -> None:
        with self._lock:
            self._writing.pop(chunk, None)
            self._written[chunk] = time.time()
            if poisoned:
                self._poisoned.add(chunk)
            else:
                self._busy.discard(chunk)

    # -- waiting for tasks ---------------------------------------------------------------
    def _wait(self, future: Future) -> tuple[Any, BaseException | None, bool]:
        """``(result, exception, completed)`` of ``future``.

        Gives up at the op timeout, and at the end of the drain.
        """
        # Waits on a done-callback: polling ``future.result(timeout=...)`` races in
        # distributed's ``sync`` (a timeout at the moment the result comes raises
        # ``UnboundLocalError``), and that would be counted against the cache.
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        deadline = time.monotonic() + self.settings.op_timeout
        while not done.wait(0.2):
            now = time.monotonic()
            if now > deadline or now > self._give_up_at:
                future.cancel()
                return None, None, False
        try:
            return future.result(), None, True
        except Exception as err:
            return None, err, True

    # -- readers ---------------------------------------------------------------------------
    def _reader(self, rng: random.Random) -> None:
        s = self.settings
        while not self._stop.is_set():
            target = self._pick_worker(rng)
            if target is None:
                time.sleep(0.1)
                continue
            chunk = rng.randrange(s.chunks)
            self._submit_read(chunk, *target)
            if rng.random() < s.pair_share:
                time.sleep(rng.uniform(*s.pair_gap))
                self._submit_read(chunk, *target)
            time.sleep(rng.uniform(*s.read_pause))

    def _hot_reader(self, rng: random.Random) -> None:
        """Waves of reads of every hot chunk, on every worker (in random order)."""
        s = self.settings
        while not self._stop.is_set():
            members = list(self._members)
            for chunk in self._hot_chunks():
                for address, name in rng.sample(members, len(members)):
                    self._submit_read(chunk, address, name)
            time.sleep(rng.uniform(0.5, 1.5) * s.hot_gap)

    def _submit_read(self, chunk: int, address: str, name: str) -> None:
        """Submit a read task (once a slot is free); it is recorded when it is done."""
        while not self._slots.acquire(timeout=0.2):
            if self._stop.is_set():
                return
        if self._stop.is_set():
            self._slots.release()
            return
        t_submit = time.time()
        try:
            future = self.client.submit(
                read_chunk,
                self.url,
                self.storage_options,
                chunk,
                self.settings.chunk_size,
                workers=[address],
                allow_other_workers=True,
                pure=False,
            )
        except Exception:
            self._slots.release()
            raise
        with self._lock:
            self._pending[future.key] = (future, chunk, name, t_submit)
        future.add_done_callback(self._read_done)

    def _read_done(self, future: Future) -> None:
        """A read task finished (Dask's callback thread): free its slot, gather beside."""
        with self._lock:
            finished = future.key in self._pending
        if finished:  # else given up at the end of the drain
            self._slots.release()
            with contextlib.suppress(RuntimeError):  # the drain ended meanwhile
                self._collector.submit(self._record_read, future)

    def _record_read(self, future: Future) -> None:
        with self._lock:
            entry = self._pending.pop(future.key, None)
        if entry is None:  # given up at the end of the drain
            return
        _, chunk, pinned, t_submit = entry
        try:
            op = ReadOp(**future.result())
        except Exception as err:  # the task itself never raises: Dask's outcome
            op = ReadOp(chunk, None, False, t_submit, time.time(), pinned, _text(err))
        with self._lock:
            self.reads.append(op)

    # -- writers ---------------------------------------------------------------------------
    def _client_writer(self, rng: random.Random) -> None:
        s = self.settings
        while not self._stop.is_set():
            claim = self._claim(rng)
            if claim is None:
                time.sleep(0.05)
                continue
            self._client_write(*claim)
            time.sleep(rng.uniform(*s.write_pause))

    def _client_write(self, chunk: int, version: int) -> None:
        """Write ``chunk`` at ``version`` from the client, record it, release the chunk."""
        s = self.settings
        value = np.full(s.chunk_size, encode(chunk, version), dtype="int64")
        t_invoke = time.time()
        try:
            self.client_array[chunk_selection(chunk, s.chunk_size)] = value
        except Exception as err:
            op = WriteOp(
                chunk, version, t_invoke, time.time(), "client", None, "failed", _text(err)
            )
        else:
            op = WriteOp(chunk, version, t_invoke, time.time(), "client", None, "ok")
        self._release(chunk)
        with self._lock:
            self.writes.append(op)

    def write_every_chunk(self) -> int:
        """After the run: one more write of each chunk no write may still be running on.

        From the client, one chunk after the other; returns the chunks written.  The
        final phase's reads then each need the source once (what read-once promises).
        """
        rng = random.Random(0)
        written = 0
        for chunk in range(self.settings.chunks):
            claim = self._claim(rng, chunk)
            if claim is not None:
                self._client_write(*claim)
                written += 1
        return written

    def _task_writer(self, rng: random.Random) -> None:
        s = self.settings
        while not self._stop.is_set():
            target = self._pick_worker(rng)
            claim = self._claim(rng) if target is not None else None
            if claim is None:
                time.sleep(0.05)
                continue
            chunk, version = claim
            t_invoke = time.time()
            future = self.client.submit(
                write_chunk,
                self.url,
                self.storage_options,
                chunk,
                s.chunk_size,
                version,
                os.path.join(self._claims, f"{chunk}-{version}"),
                workers=[target[0]],
                allow_other_workers=True,
                pure=False,
            )
            result, err, completed = self._wait(future)
            future.release()  # else Dask runs it again if its result's worker dies
            if result is not None:
                outcome = "failed" if result["error"] is not None else "ok"
                if result["rerun"]:  # the first run died: its write may have landed
                    outcome = "maybe"
                op = WriteOp(
                    chunk,
                    version,
                    t_invoke,
                    result["t_return"],
                    "task",
                    result["worker"],
                    outcome,
                    result["error"],
                )
            else:  # its worker died (or no answer came: a stall if it was long, no error)
                error = None if err is None else _text(err)
                op = WriteOp(
                    chunk, version, t_invoke, time.time(), "task", target[1], "maybe", error
                )
            self._release(chunk, poisoned=not completed)
            with self._lock:
                self.writes.append(op)
            time.sleep(rng.uniform(*s.write_pause))


def _text(err: BaseException) -> str:
    """The error and where it was raised (innermost frames; a task's are the remote ones)."""
    frames = traceback.extract_tb(err.__traceback__)[-4:]
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1])
    return f"{type(err).__name__}: {err}"[:300] + (f" [at {where}]" if where else "")
