"""Which write last replaced each key a worker saw written: what peers' bytes must be newer than."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from dask_zarr_cache.identity.keys import base_key

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["UNSEQUENCED", "WriteMarks"]

#: Mark of a write this worker applied before the scheduler numbered it (its own write,
#: applied on the spot while its event loop was blocked): newer than anything.
UNSEQUENCED = sys.maxsize


class WriteMarks:
    """The newest write this worker applied to each recently written key or prefix.

    A peer's bytes of a key are current for this worker only if the peer had applied
    every write this worker applied to that key (:meth:`needed`): a write's invalidation
    can reach the peer late, after this worker started a fetch that asks it.  Bounded:
    keys and prefixes beyond the limits are forgotten oldest first, and :attr:`floor`
    (the newest write forgotten) then stands for all of them.

    Parameters
    ----------
    max_keys, max_prefixes : int
        How many written keys and prefixes are remembered one by one.

    """

    def __init__(self, max_keys: int = 100_000, max_prefixes: int = 1_000) -> None:
        self.max_keys = max_keys
        self.max_prefixes = max_prefixes
        self.floor = 0
        self._newest = 0  # the newest numbered write marked
        self._keys: dict[str, int] = {}  # insertion order is write order
        self._prefixes: dict[str, int] = {}

    def mark(self, seq: int, keys: Iterable[str], prefixes: Iterable[str]) -> None:
        """Write ``seq`` replaced ``keys`` (whole-object cache keys) and ``prefixes``."""
        if seq < UNSEQUENCED:
            self._newest = max(self._newest, seq)
        for marks, names, limit in (
            (self._keys, keys, self.max_keys),
            (self._prefixes, prefixes, self.max_prefixes),
        ):
            for name in names:
                marks[name] = max(seq, marks.pop(name, 0))
            while len(marks) > limit:
                forgotten = marks.pop(next(iter(marks)))
                # An unnumbered write forgotten: the newest number known stands for it.
                self.floor = max(self.floor, min(forgotten, self._newest))

    def numbered(self, keys: Iterable[str], prefixes: Iterable[str], seq: int) -> None:
        """Number this worker's own write (marked :data:`UNSEQUENCED` until now) ``seq``."""
        self._newest = max(self._newest, seq)
        for marks, names in ((self._keys, keys), (self._prefixes, prefixes)):
            for name in names:
                if marks.get(name) == UNSEQUENCED:
                    marks[name] = seq

    def needed(self, key: str) -> int:
        """The newest write this worker applied that replaced cache key ``key``."""
        newest = max(self.floor, self._keys.get(base_key(key), 0))
        for prefix, seq in self._prefixes.items():
            if seq > newest and key.startswith(prefix):
                newest = seq
        return newest
