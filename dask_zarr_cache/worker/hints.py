"""What one worker knows of its peers: which served a key last, which failed lately.

A wrong hint costs one "missing" answer, never wrong bytes (peers serve only what they
hold, verified, and prove it current).  Not thread-safe on its own:
:class:`~dask_zarr_cache.worker.state.LocalState` calls it with its one lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dask_zarr_cache.core.clock import Clock

if TYPE_CHECKING:
    pass

__all__ = ["PeerHints"]

#: When a peer that left the cluster failed: never out of back-off again.
_LEFT = float("inf")


class PeerHints:
    """Owner hints (warm reads skip the index) and peers not to ask for a while.

    Parameters
    ----------
    clock : callable
        Seconds.
    backoff : float
        Seconds a peer that failed to answer is not asked again.
    max_hints : int
        Hints kept (oldest dropped first).

    """

    def __init__(self, clock: Clock, backoff: float, max_hints: int) -> None:
        self.clock = clock
        self.backoff = backoff
        self.max_hints = max_hints
        self._owners: dict[str, str] = {}
        self._failed: dict[str, float] = {}

    def owner(self, key: str) -> str | None:
        """The peer that served ``key`` last, unless it failed lately."""
        owner = self._owners.get(key)
        return None if owner is None or self.failed_lately(owner) else owner

    def served(self, key: str, address: str) -> None:
        """``address`` served ``key``: ask it first next time (unless it left since)."""
        if self._failed.get(address) == _LEFT:  # its reply came after the notice
            return
        if len(self._owners) >= self.max_hints:
            self._owners.pop(next(iter(self._owners)))
        self._owners[key] = address

    def drop(self, key: str) -> None:
        """The hinted peer did not have ``key``."""
        self._owners.pop(key, None)

    def failed(self, address: str, probe: bool = False) -> None:
        """``address`` did not answer (``probe``: within the short wait of a probe).

        A failed probe of a peer in back-off keeps the time of its first failure: slow is
        not gone. A new quiet window would make every read skip the peer unasked for
        ``read_timeout``, each reporting it unreachable to the index, which then hands out
        the peer's copies to be fetched again (chaos seed 3025: one reply 0.49 s late, and
        15 chunks were fetched twice).
        """
        if probe and address in self._failed:
            return
        self._failed[address] = self.clock()

    def answered(self, address: str) -> None:
        """``address`` answered (whatever it said): it is not frozen.

        A peer that left stays left: a reply it sent before it died can be handled after
        the notice of its departure (both waited on the sockets of a frozen worker), and
        must not bring it back (chaos seed 2033: a hint to the dead peer outlived it, and
        a read waited out ``read_timeout`` on it, then read the source uncached).
        """
        if self._failed.get(address) != _LEFT:
            self._failed.pop(address, None)

    def failed_lately(self, address: str) -> bool:
        """Whether ``address`` failed within the last ``backoff`` seconds (or left)."""
        since = self._failed.get(address)
        return since is not None and self.clock() - since < self.backoff

    def patience(self, address: str, full: float, probe: float, quiet: float) -> float:
        """Seconds a read waits for ``address`` (0: it is not asked).

        ``full`` for a peer in good standing; none for one that left, or failed less than
        ``quiet`` seconds ago (a read's whole wait: so also one that failed during this
        very read; a frozen peer costs one timeout, not one per read); ``probe`` at most
        for one in back-off since longer (a healthy one answers in time, and its answer
        ends the back-off).
        """
        since = self._failed.get(address)
        now = self.clock()
        if since is None or now - since >= self.backoff:
            return full
        if now - since < quiet:  # a peer that left failed at time infinity
            return 0.0
        return min(full, probe)

    def left(self, address: str) -> None:
        """``address`` left the cluster: forget every hint naming it."""
        self._failed[address] = _LEFT  # never asked again
        self._owners = {k: a for k, a in self._owners.items() if a != address}
