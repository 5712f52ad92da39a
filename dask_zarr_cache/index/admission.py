"""Frequency-aware admission (TinyLFU): what keeps a cache useful under scans.

With plain LRU, reading a dataset bigger than the cache pass after pass hits nothing:
every pass evicts what the next pass needs first. TinyLFU (Einziger, Friedman and Manes,
2017) keeps an approximate access count of every key seen recently, resident or not, in
a count-min sketch of a few bits per key; a new object replaces the LRU victim only if it
was accessed more often. A scan of objects seen once cannot push out what is read again,
and on a cyclic read of twice the cache the first half stays: the best any cache can do.
Counts are halved every ``10 x width`` accesses, so what was hot long ago fades.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Hashable

__all__ = ["Admission", "FrequencySketch"]

_MASK = (1 << 64) - 1
# Odd 64-bit multipliers: one independent-enough position per row from one hash.
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_MAX_COUNT = 15  # 4-bit counters, as in TinyLFU: enough to rank, never overflows
_HALVE = bytes(i // 2 for i in range(256))
_MIN_WIDTH = 1 << 12


class FrequencySketch:
    """Approximate access counts (count-min sketch with periodic halving).

    Parameters
    ----------
    width : int
        Counters (bytes) in the table; rounded up to a power of two. :meth:`fit` grows it
        with the number of keys the cache holds.

    """

    def __init__(self, width: int = _MIN_WIDTH) -> None:
        self._reset(width)

    def _reset(self, width: int) -> None:
        self._bits = max(_MIN_WIDTH, width - 1).bit_length()
        self._table = bytearray(1 << self._bits)
        self._additions = 0

    @property
    def width(self) -> int:
        """Number of counters."""
        return len(self._table)

    def fit(self, keys: int) -> None:
        """Grow the table for ``keys`` resident keys (twice as many counters).

        Growing starts the counts afresh: they are hints, and this happens only on doublings.
        """
        if 2 * keys > self.width:
            self._reset(4 * keys)

    def _positions(self, key: Hashable) -> list[int]:
        h = hash(key) & _MASK
        shift = 64 - self._bits
        return [((h * seed) & _MASK) >> shift for seed in _SEEDS]

    def increment(self, key: Hashable) -> None:
        """Count one access of ``key``."""
        table = self._table
        for i in self._positions(key):
            if table[i] < _MAX_COUNT:
                table[i] += 1
        self._additions += 1
        if self._additions >= 10 * len(table):
            self._table = bytearray(bytes(self._table).translate(_HALVE))
            self._additions //= 2

    def frequency(self, key: Hashable) -> int:
        """Estimated accesses of ``key`` (never under the truth, until halved)."""
        table = self._table
        return min(table[i] for i in self._positions(key))


class Admission:
    """The replacement policy's admission half: ``"tinylfu"``, or ``"lru"`` (admit all).

    Parameters
    ----------
    policy : {"tinylfu", "lru"}
        Which policy.
    keys : int
        Keys the cache holds now (sizes the sketch).

    """

    def __init__(self, policy: str, keys: int = 0) -> None:
        self.policy = policy
        self._sketch = FrequencySketch(2 * keys) if policy == "tinylfu" else None

    def record(self, key: Hashable) -> None:
        """Count one access of ``key`` (a miss or a hit)."""
        if self._sketch is not None:
            self._sketch.increment(key)

    def count(self, key: Hashable) -> int:
        """Estimated recent accesses of ``key`` (0 under ``"lru"``)."""
        return 0 if self._sketch is None else self._sketch.frequency(key)

    def raise_to(self, key: Hashable, count: int) -> None:
        """Count ``key`` up to at least ``count`` accesses (what others saw of it)."""
        if self._sketch is not None:
            for _ in range(min(count, _MAX_COUNT) - self._sketch.frequency(key)):
                self._sketch.increment(key)

    def fit(self, keys: int) -> None:
        """The cache now holds ``keys`` keys."""
        if self._sketch is not None:
            self._sketch.fit(keys)

    def rejects(self, newcomer: str, victim: str) -> bool:
        """Whether ``newcomer`` should leave rather than displace ``victim``.

        The newcomer must lead by more than one access: counts are estimates gathered in
        several places (the newcomer's include the cluster's misses of it, a victim's the
        reads its owner served), and a tie or near-tie would churn what a cyclic read keeps.
        """
        sketch = self._sketch
        return sketch is not None and sketch.frequency(newcomer) <= sketch.frequency(victim) + 1
