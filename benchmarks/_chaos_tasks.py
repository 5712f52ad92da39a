"""Tasks of the chaos suite: they run on the workers (importable there from the checkout).

Each process opens the array once per mode (the metadata never changes) through a
``ClusterCacheStore`` (its first task pays for that); every chunk read and write goes
through the cache.  Times are
taken inside the task with ``time.time()`` (all processes share the machine's clock).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from benchmarks._chaos_history import encode

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "StackDumps",
    "chunk_selection",
    "dump_stacks",
    "open_cached_array",
    "read_chunk",
    "read_chunks",
    "write_chunk",
]

_arrays: dict[tuple[str, str], Any] = {}
_arrays_lock = threading.Lock()


def open_cached_array(url: str, storage_options: dict[str, Any], mode: str) -> Any:
    """The zarr array at ``url`` through a ``ClusterCacheStore``, opened once per process.

    Parameters
    ----------
    url : str
        fsspec URL of the array.
    storage_options : dict
        Options of the filesystem (the loopback S3 server's).
    mode : {"r", "r+"}
        Mode of the array (and read-only-ness of the source store).

    Returns
    -------
    zarr.Array
        The array; its reads and writes go through the cache.

    """
    import zarr
    from zarr.storage import FsspecStore

    from dask_zarr_cache import ClusterCacheStore

    key = (url, mode)
    with _arrays_lock:
        arr = _arrays.get(key)
    if arr is None:
        source = FsspecStore.from_url(
            url, storage_options=dict(storage_options), read_only=mode == "r"
        )
        arr = zarr.open_array(ClusterCacheStore(source), mode=mode)
        with _arrays_lock:
            arr = _arrays.setdefault(key, arr)
    return arr


def chunk_selection(chunk: int, chunk_size: int) -> slice:
    """The elements of ``chunk``."""
    return slice(chunk * chunk_size, (chunk + 1) * chunk_size)


def _worker_name() -> str | None:
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:
        return None


def _error(err: BaseException) -> str:
    """The error and where it was raised (the innermost frames), as text."""
    frames = traceback.extract_tb(err.__traceback__)[-4:]
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1])
    return f"{type(err).__name__}: {err}"[:300] + f" [at {where}]"


def read_chunk(
    url: str, storage_options: dict[str, Any], chunk: int, chunk_size: int
) -> dict[str, Any]:
    """Read one chunk through the cache.

    The time includes opening the array: a process's first task reads the metadata
    through the cache too, and may wait as long as a chunk read.

    Parameters
    ----------
    url, storage_options : str, dict
        The array (see :func:`open_cached_array`).
    chunk : int
        Chunk to read.
    chunk_size : int
        Elements per chunk.

    Returns
    -------
    dict
        The fields of a :class:`~benchmarks._chaos_history.ReadOp`: the first element,
        whether the elements differ (torn), times, worker name, and the error as text.

    """
    worker = _worker_name()
    t_invoke = time.time()
    try:
        arr = open_cached_array(url, storage_options, "r")
        data = np.asarray(arr[chunk_selection(chunk, chunk_size)])
    except Exception as err:
        return {
            "chunk": chunk,
            "value": None,
            "torn": False,
            "t_invoke": t_invoke,
            "t_return": time.time(),
            "worker": worker,
            "error": _error(err),
        }
    t_return = time.time()
    first = int(data[0])
    return {
        "chunk": chunk,
        "value": first,
        "torn": bool((data != first).any()),
        "t_invoke": t_invoke,
        "t_return": t_return,
        "worker": worker,
        "error": None,
    }


def read_chunks(
    url: str, storage_options: dict[str, Any], chunks: list[int], chunk_size: int
) -> list[dict[str, Any]]:
    """Read each of ``chunks`` in turn (the final phase).

    Parameters
    ----------
    url, storage_options : str, dict
        The array (see :func:`open_cached_array`).
    chunks : list of int
        Chunks to read, in this order.
    chunk_size : int
        Elements per chunk.

    Returns
    -------
    list of dict
        One :func:`read_chunk` record per chunk.

    """
    return [read_chunk(url, storage_options, c, chunk_size) for c in chunks]


def write_chunk(
    url: str,
    storage_options: dict[str, Any],
    chunk: int,
    chunk_size: int,
    version: int,
    claim: str,
) -> dict[str, Any]:
    """Write ``chunk`` at ``version`` through the cache, once.

    Dask runs a finished task again when its result dies with its worker; a second run
    would put an old version back after newer ones (right for Dask, wrong for a history
    whose versions only grow).  The first run creates the file ``claim`` (every process
    of the suite shares this machine's disk); a later run finds it and writes nothing,
    and returns the first run's result if the first run recorded it there (chaos seed
    6004: a write's result died with its worker 20 s after it returned, and the re-run's
    time counted as a 20.5 s write).

    Parameters
    ----------
    url, storage_options : str, dict
        The array (see :func:`open_cached_array`).
    chunk : int
        Chunk to write (all of it).
    chunk_size : int
        Elements per chunk.
    version : int
        Version to write (see :func:`~benchmarks._chaos_history.encode`).
    claim : str
        Path this write's first run creates.

    Returns
    -------
    dict
        ``t_return`` (right after the store write returned), ``worker`` (name),
        ``error`` (text, or ``None``) and ``rerun`` (this run wrote nothing, and the
        first run left no result: it died during its write).

    """
    worker = _worker_name()
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return _first_run(claim, worker)
    try:
        arr = open_cached_array(url, storage_options, "r+")
        arr[chunk_selection(chunk, chunk_size)] = np.full(
            chunk_size, encode(chunk, version), dtype="int64"
        )
    except Exception as err:
        os.close(fd)
        return {"t_return": time.time(), "worker": worker, "error": _error(err), "rerun": False}
    t_return = time.time()
    with os.fdopen(fd, "w") as record:  # for a re-run, if this result is lost
        record.write(f"{t_return!r} {worker}")
    return {"t_return": t_return, "worker": worker, "error": None, "rerun": False}


def _first_run(claim: str, worker: str) -> dict[str, Any]:
    """What a re-run of a write returns: the first run's result, if it recorded one.

    Dask runs a task again when the worker holding its result dies before the client
    collected it: the first run's write returned then, and its time is the write's.
    Without a record the first run died during its write: it may or may not have landed.
    """
    with open(claim) as record:
        recorded = record.read().split(" ", 1)
    if len(recorded) == 2:
        return {
            "t_return": float(recorded[0]),
            "worker": recorded[1],
            "error": None,
            "rerun": False,
        }
    return {"t_return": time.time(), "worker": worker, "error": None, "rerun": True}


class StackDumps(WorkerPlugin):
    """On SIGUSR1, a worker writes every thread's stack to ``<log_dir>/stacks-<pid>.txt``.

    :mod:`faulthandler` writes from its C signal handler, so this works even when the
    worker's event loop (or the GIL) is stuck: what a hung run needs.  The file exists
    from setup on, so the runner signals only processes that will not die of SIGUSR1.

    Parameters
    ----------
    log_dir : str
        Directory of the stack files (one per process).

    """

    name = "chaos-stack-dumps"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def setup(self, worker: Any) -> None:
        """Register the dump (once per process).

        Parameters
        ----------
        worker : distributed.Worker
            The worker starting the plugin.

        """
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, f"stacks-{os.getpid()}.txt")
        file = open(path, "a")  # faulthandler writes to it until the process exits
        file.write(f"worker {worker.name} {worker.address} pid {os.getpid()}\n")
        file.flush()
        faulthandler.register(signal.SIGUSR1, file=file, all_threads=True)
        _stack_files.append(file)  # kept open for the life of the process


_stack_files: list[Any] = []


def dump_stacks(log_dir: str, ours: Callable[[int], bool]) -> list[int]:
    """SIGUSR1 every live process that registered :class:`StackDumps` in ``log_dir``.

    Parameters
    ----------
    log_dir : str
        The plugin's directory.
    ours : callable
        ``ours(pid)``: whether ``pid`` is still one of this run's worker processes (a dead
        worker's pid may belong to another process by now).

    Returns
    -------
    list of int
        The pids signalled.

    """
    signalled: list[int] = []
    if not os.path.isdir(log_dir):
        return signalled
    for name in os.listdir(log_dir):
        if name.startswith("stacks-") and name.endswith(".txt"):
            pid = int(name[len("stacks-") : -len(".txt")])
            if not ours(pid):
                continue
            try:
                os.kill(pid, signal.SIGCONT)  # a frozen process writes nothing
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            signalled.append(pid)
    return signalled
