"""Small objects in memory: copies of files on this worker's disk, served without a read.

A hit on a small object (a station's time series, a sparse chunk) cost a thread hop and
about ten system calls, as much as reading it without the cache.  :class:`MemoryCopies`
keeps the bytes of small entries beside their files, so such a hit is a dict lookup under
the lock the entries already hold.  The copies are the files' bytes: made from a read
whose checksum was verified, or from the bytes just written to the file; they need no
write-back, and the disk file stays (peers, a restart and the next cluster use it).
:class:`~dask_zarr_cache.worker.entries.Entries` drops a copy in the same step as its
entry (a write, an eviction, an expiry), and a copy is served only for the very entry it
was made for (its ``tag``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dask_zarr_cache.core.protocol import Payload

__all__ = ["MemoryCopies"]


class MemoryCopies:
    """Copies of small entries' bytes, least recently used out first, within a budget.

    Not thread-safe: the caller holds the state's lock.

    Parameters
    ----------
    budget : int
        Bytes of copies kept at most (0: none).
    object_limit : int
        Objects larger than this are not kept.

    """

    def __init__(self, budget: int, object_limit: int) -> None:
        self.budget = budget
        self.object_limit = min(object_limit, budget)
        self.nbytes = 0
        self._copies: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, key: str, tag: int) -> bytes | None:
        """The copy of ``key``'s entry ``tag``, if kept (and now the most recently used)."""
        found = self._copies.get(key)
        if found is None or found[0] != tag:
            return None
        self._copies.move_to_end(key)
        return found[1]

    def put(self, key: str, tag: int, data: Payload) -> None:
        """Keep a copy of ``data``, the bytes of ``key``'s entry ``tag``, if small enough."""
        size = len(data)
        if size > self.object_limit:
            return
        self.drop(key)
        self._copies[key] = (tag, bytes(data))
        self.nbytes += size
        while self.nbytes > self.budget:
            _, (_, old) = self._copies.popitem(last=False)
            self.nbytes -= len(old)

    def drop(self, key: str) -> None:
        """Forget the copy of ``key``, if any."""
        found = self._copies.pop(key, None)
        if found is not None:
            self.nbytes -= len(found[1])
