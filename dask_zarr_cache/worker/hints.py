"""What one worker knows of its peers: which served a key last, which failed lately.

A wrong hint costs one "missing" answer, never wrong bytes (peers serve only what they
hold, verified, and prove it current).  Not thread-safe on its own:
:class:`~dask_zarr_cache.worker.state.LocalState` calls it with its one lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PeerHints"]


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

    def __init__(self, clock: Callable[[], float], backoff: float, max_hints: int) -> None:
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
        """``address`` served ``key``: ask it first next time."""
        if len(self._owners) >= self.max_hints:
            self._owners.pop(next(iter(self._owners)))
        self._owners[key] = address

    def drop(self, key: str) -> None:
        """The hinted peer did not have ``key``."""
        self._owners.pop(key, None)

    def failed(self, address: str) -> None:
        """``address`` did not answer."""
        self._failed[address] = self.clock()

    def failed_lately(self, address: str) -> bool:
        """Whether ``address`` failed within the last ``backoff`` seconds."""
        since = self._failed.get(address)
        return since is not None and self.clock() - since < self.backoff

    def left(self, address: str) -> None:
        """``address`` left the cluster: forget every hint naming it."""
        self._failed[address] = self.clock()
        self._owners = {k: a for k, a in self._owners.items() if a != address}
