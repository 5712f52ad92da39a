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
        self._earlier: dict[str, int] = {}  # per key in _keys, the write before its newest
        self._prefixes: dict[str, int] = {}

    def mark(self, seq: int, keys: Iterable[str], prefixes: Iterable[str]) -> None:
        """Write ``seq`` replaced ``keys`` (whole-object cache keys) and ``prefixes``."""
        if seq < UNSEQUENCED:
            self._newest = max(self._newest, seq)
        for key in keys:
            newest = self._keys.pop(key, 0)
            if seq != newest:
                self._earlier[key] = max(min(seq, newest), self._earlier.get(key, 0))
            self._keys[key] = max(seq, newest)
        for prefix in prefixes:
            self._prefixes[prefix] = max(seq, self._prefixes.pop(prefix, 0))
        for marks, limit in ((self._keys, self.max_keys), (self._prefixes, self.max_prefixes)):
            while len(marks) > limit:
                name = next(iter(marks))
                forgotten = marks.pop(name)
                self._earlier.pop(name, None)
                # An unnumbered write forgotten: the newest number known stands for it.
                self.floor = max(self.floor, min(forgotten, self._newest))

    def numbered(self, keys: Iterable[str], prefixes: Iterable[str], seq: int) -> None:
        """Number this worker's own write (marked :data:`UNSEQUENCED` until now) ``seq``."""
        self._newest = max(self._newest, seq)
        for marks, names in ((self._keys, keys), (self._prefixes, prefixes)):
            for name in names:
                if marks.get(name) == UNSEQUENCED:
                    marks[name] = seq
                    if self._earlier.get(name, 0) > seq:  # numbered below an earlier mark
                        marks[name], self._earlier[name] = self._earlier[name], seq

    def replaced_between(self, key: str, after: int, seq: int) -> bool:
        """Whether a write other than ``seq``, numbered after ``after``, replaced ``key``.

        For a write ``seq`` of ``key`` that started when this worker had applied every
        write up to ``after``: ``False`` means no other write of ``key`` could have
        reached the source after it (given every write up to ``seq`` is applied here).
        Forgotten marks count as such writes.
        """
        base = base_key(key)
        newest, earlier = self._keys.get(base, 0), self._earlier.get(base, 0)
        other = earlier if newest == seq else newest
        if self.floor > after or other > after:
            return True
        return any(s > after and key.startswith(p) for p, s in self._prefixes.items())

    def needed(self, key: str) -> int:
        """The newest write this worker applied that replaced cache key ``key``."""
        newest = max(self.floor, self._keys.get(base_key(key), 0))
        for prefix, seq in self._prefixes.items():
            if seq > newest and key.startswith(prefix):
                newest = seq
        return newest
