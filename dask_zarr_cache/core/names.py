"""Names shared by the scheduler, the workers and the client: one definition each."""

from __future__ import annotations

__all__ = [
    "EXTENSION_NAME",
    "METRIC_PREFIX",
    "SCHEDULER_HANDLERS",
    "SCHEDULER_PLUGIN_NAME",
    "WARM_METADATA",
    "WORKER_HANDLERS",
    "WORKER_PLUGIN_NAME",
]

#: Key of the cache in ``worker.extensions`` and of its state in ``scheduler.extensions``.
EXTENSION_NAME = "zarr_cache"
#: Name of the scheduler plugin users register.
SCHEDULER_PLUGIN_NAME = "dask-zarr-cache"
#: Name of the worker plugin installed on every worker.
WORKER_PLUGIN_NAME = "dask-zarr-cache-worker"
#: Where ``warm()`` publishes its progress in the scheduler's metadata (for the page).
WARM_METADATA = ("zarr-cache", "warm")
#: Prefix of the cache's entries in ``worker.metrics`` (Workers table columns).
METRIC_PREFIX = "zarr_cache_"

#: Worker handlers the worker plugin installs (peers and the scheduler call them).
WORKER_HANDLERS = (
    "zarr_cache_get",  # a peer asks for an object's bytes
    "zarr_cache_invalidate",  # the scheduler pushes a write's invalidation
    "zarr_cache_stats",  # the scheduler gathers counters
    "zarr_cache_index_moved",  # a new index exists: register this worker's files
    "zarr_cache_worker_left",  # a peer left: forget hints naming it
)
#: Scheduler handlers the scheduler plugin installs (workers and clients call them).
SCHEDULER_HANDLERS = (
    "zarr_cache_index",  # where is the index actor
    "zarr_cache_sync",  # a worker catches up on writes (and renews its lease)
    "zarr_cache_invalidate",  # a writer announces a write
    "zarr_cache_stats",  # counters of every worker
    "zarr_cache_cached",  # which keys are cached (warm-up skips them)
)

#: Replacement policies of the index (``zarr-cache.policy``), the default first.
POLICIES = ("tinylfu", "lru")
