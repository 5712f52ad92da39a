"""The real clocks: the one place the package reads the time; everything else is given one.

A :data:`Clock` is any callable returning seconds.  Parts that compare times across
processes or restarts (file times, TTLs, a worker's write lease, peer back-off) take wall
time, :func:`wall_clock`; parts that only measure waits in one process (the scheduler's
leases, refresh intervals, a warm-up's deadline) take :func:`monotonic_clock`.  Unit tests
hand the same parts one fake clock (``tests.fakes.FakeClock``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "monotonic_clock", "wall_clock"]

#: Seconds, as a float: what every part that reads the time is given.
Clock = Callable[[], float]


def wall_clock() -> float:
    """Seconds since the epoch (``time.time``)."""
    return time.time()


def monotonic_clock() -> float:
    """Seconds of a clock that never goes back (``time.monotonic``)."""
    return time.monotonic()
