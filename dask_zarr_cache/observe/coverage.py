"""How much of each dataset the cluster caches: per variable, and for the dashboard.

:class:`VariableStatus` and :class:`CacheStatus` are what ``cached()`` returns and what
the dashboard's datasets table shows.  :class:`DatasetCoverage` keeps them, on the
scheduler, for every dataset read on the cluster: a dataset's objects are listed by a
worker (the scheduler never opens a source) and looked up in the index, at most once per
``interval`` and only while someone looks (the page or the JSON route).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dask_zarr_cache.core.clock import Clock, monotonic_clock
from dask_zarr_cache.core.names import EXTENSION_NAME

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from distributed import Scheduler

    from dask_zarr_cache.core.protocol import DatasetObjects

__all__ = [
    "CacheStatus",
    "DatasetCoverage",
    "NamedObjects",
    "VariableStatus",
    "cache_keys_of",
    "coverage_of",
    "status_of",
]

logger = logging.getLogger(__name__)

#: A dataset's stored objects by array path: ``{key: (cache key or None, size)}`` each.
NamedObjects = dict[str, dict[str, tuple[str | None, int]]]


@dataclass(frozen=True)
class VariableStatus:
    """How much of one array's stored objects (chunks or shards) the cluster caches."""

    objects: int  #: stored objects at the source
    bytes: int  #: their size at the source
    cached_objects: int
    cached_bytes: int

    @property
    def fraction(self) -> float:
        """Cached share of the bytes (of the objects if all are empty); 1.0 for none."""
        if self.bytes:
            return self.cached_bytes / self.bytes
        return self.cached_objects / self.objects if self.objects else 1.0


@dataclass(frozen=True)
class CacheStatus:
    """What ``cached()`` found: per variable (array path), and in all."""

    variables: dict[str, VariableStatus] = field(default_factory=dict)

    @property
    def total(self) -> VariableStatus:
        """All variables together."""
        parts = self.variables.values()
        return VariableStatus(
            sum(v.objects for v in parts),
            sum(v.bytes for v in parts),
            sum(v.cached_objects for v in parts),
            sum(v.cached_bytes for v in parts),
        )

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Each variable's numbers and ``fraction``, and the total's under ``""``."""
        rows = {**self.variables, "": self.total}
        return {name: {**vars(v), "fraction": v.fraction} for name, v in rows.items()}

    def __str__(self) -> str:
        rows = [*self.variables.items(), ("total", self.total)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'variable':<{width}}  {'cached':>15}  {'MiB cached':>21}  {'%':>5}"]
        for name, v in rows:
            lines.append(
                f"{name or '/':<{width}}  {v.cached_objects:>7}/{v.objects:<7}  "
                f"{v.cached_bytes / 2**20:>10.1f}/{v.bytes / 2**20:<10.1f}  "
                f"{100 * v.fraction:>5.1f}"
            )
        return "\n".join(lines)


def cache_keys_of(objects: NamedObjects) -> list[str]:
    """The cache keys of a dataset's objects (those the cache names), in order."""
    return [c for keys in objects.values() for c, _ in keys.values() if c is not None]


def status_of(objects: NamedObjects, held: Mapping[str, bool]) -> CacheStatus:
    """The status of a dataset's ``objects``, ``held[cache key]`` telling what is cached."""
    status = {}
    for path, keys in objects.items():
        hits = [n for c, n in keys.values() if c is not None and held[c]]
        status[path] = VariableStatus(
            len(keys), sum(n for _, n in keys.values()), len(hits), sum(hits)
        )
    return CacheStatus(status)


class DatasetCoverage:
    """The :class:`CacheStatus` of every dataset read on the cluster (scheduler side).

    Parameters
    ----------
    describe : callable
        ``await describe(dataset)`` (a pickled ``ClusterCacheStore``) gives the dataset's
        :class:`~dask_zarr_cache.core.protocol.DatasetObjects`, listed where the source can
        be opened (a worker).
    cached : callable
        ``await cached(cache_keys)`` says which keys have a ready copy (the index).
    interval : float
        Seconds between two refreshes of one dataset's numbers.
    clock : callable
        Seconds, monotonic.

    """

    def __init__(
        self,
        describe: Callable[[bytes], Awaitable[DatasetObjects]],
        cached: Callable[[list[str]], Awaitable[Sequence[bool]]],
        interval: float,
        clock: Clock = monotonic_clock,
    ) -> None:
        self._describe, self._cached, self.interval = describe, cached, interval
        self.clock = clock
        self._loop = asyncio.get_running_loop()  # the scheduler's
        self._datasets: dict[str, bytes] = {}  # by key prefix
        self._status: dict[str, tuple[str, CacheStatus]] = {}
        self._refreshed = -float("inf")
        self._refreshing: asyncio.Task[None] | None = None

    def add(self, prefix: str, dataset: bytes) -> None:
        """A dataset (its key prefix and pickled store) was read on the cluster."""
        self._datasets.setdefault(prefix, dataset)

    def latest(self) -> dict[str, dict[str, dict[str, float]]]:
        """Each dataset's status (``CacheStatus.as_dict()``) by name, as last found.

        Starts a refresh in the background when the last one is ``interval`` old.  Any
        thread may ask (Bokeh builds pages in its own).
        """
        self._loop.call_soon_threadsafe(self._refresh_if_due)
        found = sorted(list(self._status.values()), key=lambda named: named[0])
        return {name: status.as_dict() for name, status in found}

    def _refresh_if_due(self) -> None:
        due = self.clock() - self._refreshed >= self.interval
        if due and self._datasets and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self.refresh())

    async def refresh(self) -> None:
        """Find every dataset's status now (a dataset that cannot be listed keeps its last)."""
        self._refreshed = self.clock()
        for prefix, dataset in list(self._datasets.items()):
            try:
                name, objects = await self._describe(dataset)
                keys = cache_keys_of(objects)
                held = dict(zip(keys, await self._cached(keys), strict=True))
            except Exception as err:  # a listing failed: the page shows the last numbers
                logger.info("zarr cache: no status of %r: %r", prefix, err)
                continue
            self._status[prefix] = (name, status_of(objects, held))

    async def close(self) -> None:
        """Stop a refresh in flight."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing


def coverage_of(scheduler: Scheduler) -> DatasetCoverage | None:
    """The datasets' coverage on ``scheduler``'s cache, if the plugin is registered."""
    state = scheduler.extensions.get(EXTENSION_NAME)
    return None if state is None else state.coverage
