"""Which worker the running code belongs to, and its cache: one set of rules for all.

- Inside a task, and the store coroutines it starts, ``get_worker()`` names the worker.
- A thread a task started has no task context: the workers running in this process are
  the candidates.
- A process forked from a task inherits the worker object but not its event loop: a
  cache counts only in the process that started it.

Reads use the cache of the one worker this code runs for (:func:`worker_cache`); writes
tell every cluster this code can reach (``writes.announce``), from the same primitives.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dask_zarr_cache.core.names import EXTENSION_NAME

if TYPE_CHECKING:
    from distributed import Worker

    from dask_zarr_cache.core.interfaces import WorkerCacheAPI

__all__ = ["cache_of", "current_worker", "process_workers", "worker_cache"]


def current_worker() -> Worker | None:
    """The worker of the task this code runs in, or ``None``."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def process_workers() -> list[Worker]:
    """The workers running in this process and connected to a scheduler."""
    from distributed import Worker

    return [
        w
        for w in list(Worker._instances)
        if w.status.name in ("running", "paused") and w.scheduler is not None
    ]


def cache_of(worker: Worker) -> WorkerCacheAPI | None:
    """The cache installed on ``worker``, if any, and if this is the process that runs it."""
    cache: WorkerCacheAPI | None = worker.extensions.get(EXTENSION_NAME)
    return cache if getattr(cache, "pid", None) == os.getpid() else None


def worker_cache() -> WorkerCacheAPI | None:
    """The cache of the worker this code runs for, or ``None`` (client, no plugin).

    The task's worker; else, in a thread a task started, the process's only worker with a
    cache (with several, which one is not known: read through).
    """
    worker = current_worker()
    if worker is not None:
        return cache_of(worker)
    caches = [c for w in process_workers() if (c := cache_of(w)) is not None]
    return caches[0] if len(caches) == 1 else None
