"""Where one worker stands in the scheduler's write history, and what that lets it serve.

The epoch names whose history; ``applied_seq`` is the write up to which every write is
applied here (pushes may arrive out of order: the position advances over the gaps as
they fill); the lease says how long after its last catch-up this worker may serve; the
marks say which write last replaced each key this worker saw written (a peer's bytes must
not be older).  Not thread-safe on its own: :class:`~dask_zarr_cache.worker.state.LocalState`
calls it with its one lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.writes.marks import WriteMarks

if TYPE_CHECKING:
    pass

__all__ = ["Position"]


class Position:
    """A worker's position in the write history, its lease and its write marks.

    Parameters
    ----------
    lease : float
        Seconds after the last successful catch-up during which files may be served.
    clock : callable
        Seconds, wall-clock-like.

    """

    def __init__(self, lease: float, clock: Clock) -> None:
        self.lease = lease
        self.clock = clock
        self.epoch: bytes | None = None
        self.applied_seq = 0
        self._above: set[int] = set()  # writes applied beyond a gap
        self._synced_at: float | None = None
        self.marks = WriteMarks()

    def can_serve(self) -> bool:
        """Whether the last catch-up was sent less than ``lease`` seconds ago."""
        return self._synced_at is not None and self.clock() - self._synced_at < self.lease

    def applied(self, seq: int) -> None:
        """Write ``seq`` was applied (pushed: maybe out of order)."""
        if seq > self.applied_seq:
            self._above.add(seq)
            self._advance()

    def has_applied(self, seq: int) -> bool:
        """Whether write ``seq`` (of this worker's epoch) was applied here."""
        return seq <= self.applied_seq or seq in self._above

    def synced(self, epoch: bytes, seq: int, sent_at: float) -> None:
        """A catch-up sent at ``sent_at`` applied every write of ``epoch`` up to ``seq``."""
        self.applied_seq = max(seq, self.applied_seq) if epoch == self.epoch else seq
        self._above = {s for s in self._above if s > self.applied_seq}
        self._advance()
        self.epoch = epoch
        self._synced_at = sent_at

    def forget(self, seq: int) -> None:
        """The history up to ``seq`` is lost: peers' bytes count from ``seq`` on only."""
        self.marks = WriteMarks()
        self.marks.floor = seq

    def current(self, key: str, epoch: object, seq: object) -> bool:
        """Whether a peer's bytes of ``key`` at its position ``(epoch, seq)`` are current.

        They are if the peer had applied every write this worker applied to ``key``.
        """
        if epoch != self.epoch or not isinstance(seq, int):
            return False
        return seq >= self.marks.needed(key)

    def _advance(self) -> None:
        while self.applied_seq + 1 in self._above:
            self.applied_seq += 1
            self._above.discard(self.applied_seq)
