"""Trace simulator: hit ratios of the replacement policies on synthetic traces.

Drives a worker's real :class:`~dask_zarr_cache.worker.budget.Budget` and the real
:class:`~dask_zarr_cache.index.shard.CacheIndex` the way a worker does (one worker, unit-size
objects) with the access sequences that matter for a chunk cache:

- ``scan``: a dataset twice the cache, read in full 4 times (the cyclic pattern that
  defeats LRU; the best any cache can do on passes 2-4 is 50%);
- ``skewed``: 80% of reads on 20% of the chunks (that hot 20% fits the cache);
- ``mixed``: the skewed reads, interrupted by one-off scans of other data as big as
  the cache (a user's ad-hoc job on a shared cluster); the hot set should survive them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from benchmarks import _report
from dask_zarr_cache.core.names import POLICIES
from dask_zarr_cache.core.protocol import FETCH
from dask_zarr_cache.index.digests import key_digest
from dask_zarr_cache.index.shard import CacheIndex
from dask_zarr_cache.worker.budget import Budget

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

WORKER = "tcp://sim:1"


def scan(capacity: int, passes: int = 4) -> Iterator[str]:
    """``passes`` full reads of ``2 x capacity`` chunks."""
    for _ in range(passes):
        yield from (f"scan/{i}" for i in range(2 * capacity))


def skewed(capacity: int, reads: int, seed: int = 0) -> Iterator[str]:
    """80% of ``reads`` on ``capacity`` hot chunks, the rest on ``4 x capacity`` cold ones."""
    rng = random.Random(seed)
    for _ in range(reads):
        if rng.random() < 0.8:
            yield f"hot/{rng.randrange(capacity)}"
        else:
            yield f"cold/{rng.randrange(4 * capacity)}"


def mixed(capacity: int, reads: int, seed: int = 0) -> Iterator[str]:
    """:func:`skewed` reads with a one-off scan of ``capacity`` new chunks every so often."""
    for n, key in enumerate(skewed(capacity, reads, seed)):
        yield key
        if n % (2 * capacity) == 2 * capacity - 1:
            yield from (f"once/{n}/{i}" for i in range(capacity))


def simulate(policy: str, trace: Iterable[str], capacity: int) -> tuple[int, int]:
    """Run ``trace`` through one worker's budget of ``capacity`` objects; ``(hits, reads)``.

    A miss asks the index (which counts it), and the worker admits the object or not
    given the index's count, then commits it or gives its claim back, and reports what
    it evicted, as :class:`~dask_zarr_cache.worker.cache.WorkerCache` does.
    """
    budget = Budget(capacity, policy)
    index = CacheIndex(policy=policy, clock=lambda: 0.0)
    hits = reads = 0
    for key in trace:
        reads += 1
        if key in budget:
            hits += 1
            budget.touch(key)
            continue
        digest = key_digest(key)
        (decision,) = index.acquire(WORKER, [digest])
        assert decision.kind == FETCH
        budget.record(key, decision.reads)
        evicted = budget.admit(key, 1)
        if key in evicted:
            index.abandon(WORKER, [digest])
        else:
            assert not index.commit(WORKER, [(digest, 0)])
        index.touch(WORKER, [(key_digest(k), 0) for k in evicted if k != key])
        assert budget.used <= capacity and len(index) == len(budget)
    return hits, reads


def hit_ratios(capacity: int = 1000) -> dict[str, dict[str, float]]:
    """Hit ratio per trace and policy. ``scan`` counts passes 2-4 only (pass 1 is cold)."""
    reads = 20 * capacity
    traces = {
        "scan (2x cache, 4 passes; passes 2-4)": lambda: scan(capacity),
        "skewed (80% of reads on 20% of chunks)": lambda: skewed(capacity, reads),
        "mixed (skewed + one-off scans)": lambda: mixed(capacity, reads),
    }
    out: dict[str, dict[str, float]] = {}
    for name, trace in traces.items():
        out[name] = {}
        for policy in POLICIES:
            hits, n = simulate(policy, trace(), capacity)
            if name.startswith("scan"):
                n -= 2 * capacity  # pass 1 can hit nothing
            out[name][policy] = hits / n
    return out


def policy_markdown(capacity: int = 1000) -> str:
    """:func:`hit_ratios` as a markdown table."""
    ratios = hit_ratios(capacity)
    rows = ([name, *(f"{by[p]:.1%}" for p in POLICIES)] for name, by in ratios.items())
    table = _report.table(["trace", *(f"{p} hit ratio" for p in POLICIES)], rows)
    head = f"Cache of {capacity} objects, one worker, the real `Budget` and `CacheIndex`."
    return f"{head}\n\n{table}"


if __name__ == "__main__":
    print(policy_markdown())
