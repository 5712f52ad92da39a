"""Names shared by the scheduler, the workers and the client: one definition each."""

from __future__ import annotations

__all__ = [
    "EXTENSION_NAME",
    "METRIC_PREFIX",
    "SCHEDULER_PLUGIN_NAME",
    "WARM_METADATA",
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

#: Replacement policies of the index (``zarr-cache.policy``), the default first.
POLICIES = ("tinylfu", "lru")
