"""``DigestTable``: the index's entries in flat numpy columns, by 64-bit key digest.

A Python dict of key strings to entry objects costs ~300 bytes per key; 10 million keys
would take 3 GB of the worker hosting the index.  Here a key is its 64-bit digest (see
:func:`~dask_zarr_cache.index.digests.key_digest`), and an entry is one row of four columns:
18 bytes, in a table kept at most :data:`MAX_LOAD` full (30-60 bytes per key).

Open addressing with linear probing: a digest lives at the first free slot from its
home slot (its low bits) on; removal shifts later rows of the probe run back, so there
are no tombstones.  Per-key operations index the columns through memoryviews (Python
ints, no numpy scalars); growth and bulk removal re-place every row with numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAX_LOAD", "DigestTable"]

#: Fraction of slots in use above which the table doubles.
MAX_LOAD = 0.6
_MIN_SIZE = 1024


class DigestTable:
    """Rows ``(digest, owner, tag, created)`` by digest; digest 0 means an empty slot.

    ``owner`` is a small integer naming a worker (``uint16``), ``tag`` the owner's serial
    of its copy (``uint32``), ``created`` seconds since the index's epoch (``float32``).
    Slot numbers are valid until the next insertion or removal.
    """

    def __init__(self) -> None:
        self.count = 0
        self._allocate(_MIN_SIZE)

    def __len__(self) -> int:
        return self.count

    def _allocate(self, size: int) -> None:
        self.size = size
        self._mask = size - 1
        self.digests = np.zeros(size, np.uint64)
        self.owners = np.zeros(size, np.uint16)
        self.tags = np.zeros(size, np.uint32)
        self.created = np.zeros(size, np.float32)
        self._views()

    def _views(self) -> None:
        # Item access through a memoryview is several times faster than numpy's scalar
        # indexing; typeshed types every memoryview item as int, hence ``Any``.
        self._d: Any = self.digests.data
        self._o: Any = self.owners.data
        self._t: Any = self.tags.data
        self._c: Any = self.created.data

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns."""
        return self.digests.nbytes + self.owners.nbytes + self.tags.nbytes + self.created.nbytes

    # -- rows -----------------------------------------------------------------------------
    def find(self, digest: int) -> int:
        """Slot of ``digest``, or -1."""
        d, mask = self._d, self._mask
        i = digest & mask
        while True:
            found = d[i]
            if found == digest:
                return i
            if not found:
                return -1
            i = (i + 1) & mask

    def row(self, slot: int) -> tuple[int, int, float]:
        """``(owner, tag, created)`` at ``slot``."""
        return self._o[slot], self._t[slot], self._c[slot]

    def put(self, digest: int, owner: int, tag: int, created: float) -> None:
        """Insert a row, or replace the row of ``digest``."""
        if self.count + 1 > MAX_LOAD * self.size:
            self._replace(np.ones(self.size, bool), 2 * self.size)
        d, mask = self._d, self._mask
        i = digest & mask
        while d[i] and d[i] != digest:
            i = (i + 1) & mask
        if not d[i]:
            self.count += 1
        d[i] = digest
        self._o[i], self._t[i], self._c[i] = owner, tag & 0xFFFFFFFF, created

    def set_tag(self, slot: int, tag: int) -> None:
        """Replace the tag of the row at ``slot``."""
        self._t[slot] = tag & 0xFFFFFFFF

    def remove(self, slot: int) -> None:
        """Remove the row at ``slot``, shifting back rows that probed past it."""
        d, mask = self._d, self._mask
        hole = slot
        j = slot
        while True:
            j = (j + 1) & mask
            found = d[j]
            if not found:
                break
            home = found & mask
            # The row at j may fill the hole unless its home lies cyclically in (hole, j].
            if (hole < j and (home <= hole or home > j)) or (hole > j and hole >= home > j):
                d[hole] = found
                self._o[hole], self._t[hole], self._c[hole] = self._o[j], self._t[j], self._c[j]
                hole = j
        d[hole] = 0
        self._o[hole] = self._t[hole] = 0
        self.count -= 1

    # -- bulk -----------------------------------------------------------------------------
    def slots_where(self, mask: np.ndarray) -> np.ndarray:
        """Slots of the occupied rows where ``mask`` (a boolean per slot) holds."""
        return np.flatnonzero(mask & (self.digests != 0))

    def drop(self, mask: np.ndarray) -> int:
        """Remove every row where ``mask`` holds; returns how many (one numpy pass)."""
        doomed = int(np.count_nonzero(mask & (self.digests != 0)))
        if doomed:
            self._replace(~mask, self.size)
        return doomed

    def _replace(self, keep: np.ndarray, size: int) -> None:
        """Re-place the rows where ``keep`` holds into a table of ``size`` slots.

        Rows sorted by home slot take, in that order, the first free slot from their home
        on: ``max(home, previous slot + 1)``, a running maximum.  The few that run past the
        end wrap around one by one, as :meth:`put` would place them.
        """
        slots = np.flatnonzero(keep & (self.digests != 0))
        targets: list[np.ndarray[Any, Any]] = [self.digests, self.owners, self.tags, self.created]
        columns = [c[slots] for c in targets]
        home = (self.digests[slots] & np.uint64(size - 1)).astype(np.int64)
        order = np.argsort(home, kind="stable")
        columns = [c[order] for c in columns]
        home = home[order]
        steps = np.arange(len(home), dtype=np.int64)
        place = np.maximum.accumulate(home - steps) + steps if len(home) else home
        inside = place < size
        self._allocate(size)
        targets = [self.digests, self.owners, self.tags, self.created]
        for target, column in zip(targets, columns, strict=True):
            target[place[inside]] = column[inside]
        self.count = int(np.count_nonzero(inside))
        for digest, owner, tag, created in zip(
            *(c[~inside].tolist() for c in columns), strict=True
        ):
            self.put(digest, owner, tag, created)
