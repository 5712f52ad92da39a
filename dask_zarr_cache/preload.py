"""Dask preload: ``--preload dask_zarr_cache.preload`` installs the cluster cache.

Settings come from dask config, i.e. the environment of the process::

    export DASK_ZARR_CACHE__MAX_SIZE=50GiB DASK_ZARR_CACHE__DIRECTORY=/cache
    dask scheduler --preload dask_zarr_cache.preload
    dask worker tcp://scheduler:8786 --preload dask_zarr_cache.preload

- On a **scheduler**, importing this module lists the "Zarr Cache" page in the dashboard's
  "More..." menu (the dashboard is built after preloads are imported), and ``dask_setup``
  registers :class:`~dask_zarr_cache.ZarrCachePlugin`, which installs the cache on every
  worker that connects.
- On a **worker**, ``dask_setup`` asks the scheduler to register the plugin (idempotent:
  the scheduler's own preload, or the first worker, wins), so a worker-only preload also
  works.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed import Scheduler, Worker
from distributed.protocol.pickle import dumps

from dask_zarr_cache.observe.dashboard import register_dashboard_page
from dask_zarr_cache.plugin import ZarrCachePlugin

__all__ = ["dask_setup"]

#: Registrations under way (a task the loop holds only weakly could vanish midway).
_registering: set[asyncio.Future[None]] = set()

logger = logging.getLogger(__name__)

register_dashboard_page()


async def dask_setup(server: Any) -> None:
    """Install the cache with settings from dask config (``zarr-cache.*``)."""
    plugin = ZarrCachePlugin()  # every argument from dask config; invalid ones raise here
    if isinstance(server, Scheduler):
        await server.register_scheduler_plugin(plugin, name=plugin.name, idempotent=True)
    elif isinstance(server, Worker):
        task = asyncio.ensure_future(_register_from_worker(server, plugin))
        _registering.add(task)
        task.add_done_callback(_registering.discard)


async def _register_from_worker(worker: Worker, plugin: ZarrCachePlugin) -> None:
    # dask_setup runs before the worker has registered with the scheduler.
    while worker.status.name not in ("running", "paused"):
        if worker.status.name in ("closing", "closed", "failed"):
            return
        await asyncio.sleep(0.1)
    try:
        await worker.scheduler.register_scheduler_plugin(
            plugin=dumps(plugin), name=plugin.name, idempotent=True
        )
    except Exception:
        logger.exception("dask-zarr-cache preload could not register its plugin")
