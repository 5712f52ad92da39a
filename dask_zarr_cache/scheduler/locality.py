"""Locality: run each chunk read on the worker that holds, or will hold, that chunk.

Every cached object has a *home* worker: its cache key's place on a consistent-hash ring
of the running workers. When a graph arrives, the scheduler plugin finds the tasks that
read zarr chunks through a :class:`~dask_zarr_cache.ClusterCacheStore` (dask-array
``getter`` tasks over a zarr array, bare or inside xarray's lazy wrappers) and asks Dask,
loosely, to run each on the home of the chunks it reads. Loosely: Dask still moves such a
task elsewhere when the home is gone or busy (work stealing), so its balancing is kept.

With nothing cached yet, the first pass reads each chunk on its home, which then owns it;
every later pass finds it there, on local disk. No index lookup is needed on the
scheduler: the ring is a pure function of the key and the worker set, and it moves only
about ``1/n`` of the keys when one of ``n`` workers comes or goes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from dask_zarr_cache.identity.stores import SourceIdentity

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    Resolve = Callable[[Any], Any]

__all__ = ["HashRing", "chunk_cache_keys", "home_ring", "steer_reads"]

logger = logging.getLogger(__name__)

#: Points per worker on the ring: enough to spread keys within a few percent.
_POINTS = 64
#: Chunks looked at per task when voting for its home (a task may read many).
_MAX_CHUNKS = 16
_GETTERS = {"getter", "getter_nofancy", "getter_inline"}
#: Spec nodes looked at per task: fused subgraphs are small; anything bigger is not a read.
_MAX_NODES = 200


def _hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashRing:
    """Consistent hashing of cache keys over workers.

    Parameters
    ----------
    workers : iterable of str
        Worker addresses.

    """

    def __init__(self, workers: Iterable[str]) -> None:
        self.workers = tuple(sorted(set(workers)))
        points = sorted((_hash(f"{w}#{i}"), w) for w in self.workers for i in range(_POINTS))
        self._points = [p for p, _ in points]
        self._owners = [w for _, w in points]

    def home(self, key: str) -> str | None:
        """The worker ``key`` belongs to (``None`` without workers)."""
        if not self._points:
            return None
        i = bisect.bisect(self._points, _hash(key)) % len(self._points)
        return self._owners[i]

    def home_of_most(self, keys: Iterable[str]) -> str | None:
        """The home of most of ``keys`` (the first of them on a tie)."""
        votes = Counter(self.home(k) for k in keys)
        return votes.most_common(1)[0][0] if votes else None


def chunk_cache_keys(spec: Any, resolve: Resolve) -> list[str]:
    """Cache keys of the zarr objects a task reads through dask-array ``getter`` tasks.

    The getter may be the task itself or fused into it (``astype``, reductions...).
    Returns ``[]`` for any other task.

    Parameters
    ----------
    spec : dask task spec
        The task's ``run_spec``.
    resolve : callable
        Returns the ``run_spec`` of another task by key, or ``None`` (the array is
        usually its own task, ``original-...``).

    """
    keys: list[str] = []
    for getter, scope in _getters(spec, resolve):
        array = _zarr_array(_value(getter.args[0], scope))
        store: Any = getattr(array, "store", None)
        location = getattr(store, "location", None)
        if not isinstance(location, SourceIdentity):  # not read through the cluster cache
            continue
        prefix = f"{array.path}/" if array.path else ""
        index = _value(getter.args[1], scope)
        for c in itertools.islice(_object_coords(array, index), _MAX_CHUNKS):
            key = location.read_key(store._store, prefix + array.metadata.encode_chunk_key(c))
            if key is not None:
                keys.append(key)
        if len(keys) >= _MAX_CHUNKS:
            break
    return keys


def _value(arg: Any, scope: Resolve) -> Any:
    """What a task argument stands for: references followed, data nodes unwrapped."""
    from dask._task_spec import Alias, DataNode, TaskRef

    for _ in range(4):
        if isinstance(arg, TaskRef):
            arg = scope(arg.key)
        elif isinstance(arg, Alias):
            arg = scope(arg.target)
        elif isinstance(arg, DataNode):
            return arg.value
        else:
            return arg
    return None


def _getters(spec: Any, resolve: Resolve) -> Iterator[tuple[Any, Resolve]]:
    """The ``getter`` tasks in ``spec`` with the scope their references live in.

    Fused tasks (``_execute_subgraph(inner, outkey, inkeys, *dependencies)``) hold their
    own little graph: references in it name its tasks or its inputs. Bounded search.
    """
    from dask._task_spec import Task

    todo: list[tuple[Any, Resolve]] = [(spec, resolve)]
    seen = 0
    while todo and seen < _MAX_NODES:
        node, scope = todo.pop()
        seen += 1
        if isinstance(node, Task):
            name = getattr(node.func, "__name__", None)
            if name in _GETTERS and len(node.args) >= 2:
                yield node, scope
            elif name == "_execute_subgraph" and len(node.args) >= 3:
                inner, _, inkeys, *inputs = node.args
                subgraph = dict(inner)
                local = {**subgraph, **dict(zip(inkeys, inputs, strict=False))}
                todo += [(t, _scoped(local, scope)) for t in subgraph.values()]
            else:
                todo += [(a, scope) for a in (*node.args, *node.kwargs.values())]
        elif isinstance(node, dict):
            todo += [(v, scope) for v in node.values()]
        elif isinstance(node, list | tuple):
            todo += [(v, scope) for v in node]


def _scoped(local: dict[Any, Any], outer: Resolve) -> Resolve:
    return lambda key: local[key] if key in local else outer(key)


def _zarr_array(obj: Any) -> Any:
    """The zarr array under xarray's lazy wrappers, if they select all of it."""
    import zarr

    for _ in range(8):
        if isinstance(obj, zarr.Array):
            return obj
        inner = getattr(obj, "_array", None)  # xarray's ZarrArrayWrapper
        if isinstance(inner, zarr.Array):
            return inner
        key = getattr(obj, "key", None)  # LazilyIndexedArray: only the identity selection
        if key is not None and any(k != slice(None) for k in getattr(key, "tuple", (None,))):
            return None
        obj = getattr(obj, "array", None)
        if obj is None:
            return None
    return None


def _object_coords(array: Any, index: Any) -> Iterable[tuple[int, ...]]:
    """Coordinates of the stored objects (chunks, or shards) under a basic selection."""
    shape = array.shards or array.chunks
    if not isinstance(index, tuple) or len(index) != len(shape):
        return ()
    ranges = []
    for sel, size, extent in zip(index, shape, array.shape, strict=True):
        if isinstance(sel, int):
            sel = slice(sel, sel + 1)
        if not isinstance(sel, slice) or sel.step not in (None, 1):
            return ()
        start, stop, _ = sel.indices(extent)
        if stop <= start:
            return ()
        ranges.append(range(start // size, (stop - 1) // size + 1))
    return itertools.product(*ranges)


@functools.lru_cache(maxsize=4)
def _ring(workers: tuple[str, ...]) -> HashRing:
    return HashRing(workers)


def home_ring(scheduler: Any) -> HashRing:
    """The ring of the scheduler's running workers."""
    return _ring(tuple(sorted(ws.address for ws in scheduler.running)))


def steer_reads(scheduler: Any, keys: Iterable[Any]) -> int:
    """Ask Dask to run the chunk reads among tasks ``keys`` on their chunks' home.

    Tasks with restrictions of their own are left alone. Returns the number steered.
    """
    ring = home_ring(scheduler)
    if len(ring.workers) < 2:
        return 0

    def resolve(key: Any) -> Any:
        ts = scheduler.tasks.get(key)
        return None if ts is None else ts.run_spec

    steered = 0
    for key in keys:
        ts = scheduler.tasks.get(key)
        if ts is None or ts.run_spec is None or ts.state != "released":
            continue
        if ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions:
            continue
        try:
            home = ring.home_of_most(chunk_cache_keys(ts.run_spec, resolve))
        except Exception:  # an array shape this module does not know: leave it to Dask
            logger.debug("no locality for task %s", key, exc_info=True)
            continue
        if home is not None:
            ts.worker_restrictions = {home}
            ts.loose_restrictions = True
            steered += 1
    return steered
