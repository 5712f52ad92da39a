"""Late messages for the chaos suite: a worker plugin delaying the cache's own messages.

:class:`ChaosDelays` wraps two worker handlers of the cache:

- the **invalidation** the scheduler pushes for a write (:data:`INVALIDATE_HANDLER`) is
  held back before it is applied, as over a slow scheduler-to-worker link;
- a **peer's reply** with an object's bytes (:data:`PEER_GET_HANDLER`) is computed at once
  and held back before it goes on the wire.

Each delay appends one JSON line to a file of its own process in ``log_dir`` as it
starts, so delays are counted even in processes killed later (:func:`read_delay_logs`).

The cache installs its handlers in its own plugin's ``setup``.  On a worker that
(re)connects, distributed starts the setups of all worker plugins together
(``asyncio.gather`` in ``Worker._register_with_scheduler``), not one after the other: the
cache's setup awaits its first catch-up before it installs the handlers, so this plugin's
setup may well run first.  It therefore wraps whatever handler is installed and keeps
watching: a handler that is not its wrapper (installed later, or again by a new
registration of the cache) is wrapped within :data:`WATCH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import time
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from collections.abc import Callable

    from distributed import Worker

__all__ = [
    "INVALIDATE_HANDLER",
    "PEER_GET_HANDLER",
    "PLUGIN_NAME",
    "ChaosDelays",
    "install_fixed_delays",
    "read_delay_logs",
    "wrap_handlers",
]

#: The cache's worker handler applying a write pushed by the scheduler.
INVALIDATE_HANDLER = "zarr_cache_apply_write"
#: The cache's worker handler serving an object's bytes to a peer.
PEER_GET_HANDLER = "zarr_cache_get"
#: Name of the plugin on the workers.
PLUGIN_NAME = "chaos-delays"
#: Seconds between checks that the handlers are still wrapped.
WATCH_INTERVAL = 0.02
#: Attribute marking a wrapper (and naming the handler it wraps).
_WRAPPED = "__chaos_wrapped__"


def _uniform_or_none(
    rng: random.Random, fraction: float, bounds: tuple[float, float]
) -> Callable[[], float | None]:
    def choose() -> float | None:
        return rng.uniform(*bounds) if rng.random() < fraction else None

    return choose


class _Log:
    """One append-only file of delays per process (a line each, flushed at once)."""

    def __init__(self, log_dir: str | None, worker: str) -> None:
        self.worker = worker
        self._file = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, f"delays-{os.getpid()}.jsonl")
            self._file = open(path, "a", buffering=1)

    def __call__(self, kind: str, delay: float) -> None:
        if self._file is not None:
            now = time.time()
            line = {"kind": kind, "worker": self.worker, "t_start": now, "t_end": now + delay}
            self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def _call(handler: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    result = handler(**kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _late_invalidation(
    original: Callable[..., Any], delay_for: Callable[[], float | None], log: _Log
) -> Callable[..., Any]:
    async def late_invalidation(**kwargs: Any) -> Any:
        delay = delay_for()
        if delay:
            log("delay-invalidate", delay)
            await asyncio.sleep(delay)
        return await _call(original, kwargs)

    setattr(late_invalidation, _WRAPPED, original)
    return late_invalidation


def _slow_reply(
    original: Callable[..., Any], delay_for: Callable[[], float | None], log: _Log
) -> Callable[..., Any]:
    async def slow_reply(**kwargs: Any) -> Any:
        reply = await _call(original, kwargs)
        delay = delay_for()
        if delay:
            log("delay-peer", delay)
            await asyncio.sleep(delay)
        return reply

    setattr(slow_reply, _WRAPPED, original)
    return slow_reply


def wrap_handlers(
    worker: Worker,
    invalidate_delay: Callable[[], float | None],
    peer_delay: Callable[[], float | None],
    log: Callable[[str, float], None] | None = None,
) -> list[str]:
    """Wrap the cache's handlers of ``worker`` that are installed and not wrapped yet.

    Parameters
    ----------
    worker : distributed.Worker
        The worker (in its own process, on its loop).
    invalidate_delay, peer_delay : callable
        Return the seconds to hold back the next invalidation / peer reply, or ``None``.
    log : callable, optional
        ``log(kind, seconds)`` for each delay.

    Returns
    -------
    list of str
        The handlers wrapped now.

    """
    log = log or (lambda kind, delay: None)
    wrapped = []
    for name, wrap, delay in (
        (INVALIDATE_HANDLER, _late_invalidation, invalidate_delay),
        (PEER_GET_HANDLER, _slow_reply, peer_delay),
    ):
        handler = worker.handlers.get(name)
        if handler is not None and not hasattr(handler, _WRAPPED):
            worker.handlers[name] = wrap(handler, delay, log)
            wrapped.append(name)
    return wrapped


def unwrap_handlers(worker: Worker) -> None:
    """Put the cache's own handlers back.

    Parameters
    ----------
    worker : distributed.Worker
        A worker whose handlers :func:`wrap_handlers` wrapped.

    """
    for name in (INVALIDATE_HANDLER, PEER_GET_HANDLER):
        handler = worker.handlers.get(name)
        original = getattr(handler, _WRAPPED, None)
        if original is not None:
            worker.handlers[name] = original


def install_fixed_delays(
    dask_worker: Worker, invalidate: float = 0.0, peer: float = 0.0
) -> list[str]:
    """For ``client.run``: delay every invalidation / peer reply of this worker.

    Parameters
    ----------
    dask_worker : distributed.Worker
        The worker (``client.run`` passes it).
    invalidate : float
        Seconds each pushed invalidation waits before it is applied (0: none).
    peer : float
        Seconds each peer reply waits before it is sent (0: none).

    Returns
    -------
    list of str
        The handlers wrapped (both, on a worker with the cache installed).

    """
    return wrap_handlers(
        dask_worker,
        (lambda: invalidate) if invalidate else (lambda: None),
        (lambda: peer) if peer else (lambda: None),
    )


class ChaosDelays(WorkerPlugin):
    """Hold back a random share of the cache's invalidations and peer replies.

    Register it after the cache's plugin; it wraps the cache's handlers as soon as they
    exist, and again whenever they are installed anew (see the module docstring).

    Parameters
    ----------
    seed : int
        Seed of the run; each worker draws from ``Random(f"{seed}:{worker name}")``.
    invalidate_fraction : float
        Share of invalidations held back.
    invalidate_delay : tuple of float
        Bounds (seconds) of an invalidation's delay, drawn uniformly.
    peer_fraction : float
        Share of peer replies held back.
    peer_delay : tuple of float
        Bounds (seconds) of a peer reply's delay, drawn uniformly.
    log_dir : str, optional
        Directory of the delay logs (one file per process).

    """

    name = PLUGIN_NAME

    def __init__(
        self,
        seed: int,
        invalidate_fraction: float = 0.15,
        invalidate_delay: tuple[float, float] = (0.02, 0.3),
        peer_fraction: float = 0.15,
        peer_delay: tuple[float, float] = (0.05, 0.5),
        log_dir: str | None = None,
    ) -> None:
        self.seed = seed
        self.invalidate_fraction = invalidate_fraction
        self.invalidate_delay = tuple(invalidate_delay)
        self.peer_fraction = peer_fraction
        self.peer_delay = tuple(peer_delay)
        self.log_dir = log_dir
        self._watcher: asyncio.Task[None] | None = None
        self._log: _Log | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_watcher"] = state["_log"] = None  # worker-side only
        return state

    async def setup(self, worker: Worker) -> None:
        """Wrap the handlers now if they exist, and keep them wrapped.

        Parameters
        ----------
        worker : distributed.Worker
            The worker starting the plugin.

        """
        rng = random.Random(f"{self.seed}:{worker.name}")
        invalidate = _uniform_or_none(rng, self.invalidate_fraction, self.invalidate_delay)
        peer = _uniform_or_none(rng, self.peer_fraction, self.peer_delay)
        self._log = _Log(self.log_dir, str(worker.name))
        log = self._log
        wrap_handlers(worker, invalidate, peer, log)

        async def keep_wrapped() -> None:
            while True:
                await asyncio.sleep(WATCH_INTERVAL)
                wrap_handlers(worker, invalidate, peer, log)

        self._watcher = asyncio.ensure_future(keep_wrapped())

    async def teardown(self, worker: Worker) -> None:
        """Stop watching and put the cache's handlers back.

        Parameters
        ----------
        worker : distributed.Worker
            The worker removing the plugin.

        """
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        unwrap_handlers(worker)
        if self._log is not None:
            self._log.close()


def read_delay_logs(log_dir: str) -> list[dict[str, Any]]:
    """Every delay logged in ``log_dir``.

    Parameters
    ----------
    log_dir : str
        The ``log_dir`` given to :class:`ChaosDelays`.

    Returns
    -------
    list of dict
        One per delay: ``kind`` (``delay-invalidate`` or ``delay-peer``), ``worker``
        (name), ``t_start``, ``t_end``.  A line cut short by a kill is skipped.

    """
    delays = []
    if not os.path.isdir(log_dir):
        return delays
    for name in sorted(os.listdir(log_dir)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    delays.append(json.loads(line))
    return delays
