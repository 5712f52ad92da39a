"""A worker's cache counters, and their cluster-wide totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["CacheCounters", "total_of"]


@dataclass
class CacheCounters:
    """Counters of one worker's cache.

    ``entries`` and ``bytes`` are gauges (what the worker's disk holds now); every other
    field only grows.
    """

    hits: int = 0  #: reads served from this worker's disk (its memory copies included)
    hit_bytes: int = 0
    memory_hits: int = 0  #: of the hits, those served from a copy in memory
    memory_hit_bytes: int = 0
    misses: int = 0  #: reads not on this worker's disk
    remote_reads: int = 0  #: GETs sent to the source store
    remote_bytes: int = 0
    peer_reads: int = 0  #: reads served by another worker's cache
    peer_bytes: int = 0
    peer_served: int = 0  #: reads this worker served to other workers
    peer_served_bytes: int = 0
    entries: int = 0
    bytes: int = 0
    capacity: int = 0
    evictions: int = 0
    expired: int = 0
    fallbacks: int = 0  #: reads that went to the source because the index or a peer failed
    stale_refused: int = 0  #: peer replies refused: older than a write this worker applied
    disk_errors: int = 0  #: cache writes that failed (disk full, unwritable, ...)
    caching_disabled: int = 0  #: 1 once disk trouble turned this worker to read-through
    adopted: int = 0  #: files of an earlier cluster kept: the source showed them unchanged
    adopt_refused: int = 0  #: files of an earlier cluster dropped: changed, or not shown current
    revalidated: int = 0  #: objects a check of the source (``revalidate_after``) kept
    revalidate_dropped: int = 0  #: objects a check of the source dropped: changed, or unknown
    # Where readers' time went, in microseconds (reads overlap: a sum over readers).
    read_us: int = 0  #: in the cache's read path, in all (hits, misses, fallbacks)
    read_busy_us: int = 0  #: with at least one read in the cache's read path
    index_wait_us: int = 0  #: waiting for the index's decisions
    peer_wait_us: int = 0  #: waiting for peers' replies
    source_wait_us: int = 0  #: waiting for source reads
    file_write_us: int = 0  #: writing fetched objects to disk before the reader got them

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def total_of(per_worker: dict[str, dict[str, int]]) -> dict[str, int]:
    """Sum per-worker counter dicts into cluster totals."""
    total = {f.name: 0 for f in fields(CacheCounters)}
    for counters in per_worker.values():
        for name in total:
            total[name] += int(counters.get(name, 0))
    return total
