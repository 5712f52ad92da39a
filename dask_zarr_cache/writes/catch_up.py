"""The worker's side of the write protocol: catching up with the scheduler's write history.

Every ``flush-interval`` a worker sends where it stands in the history; the scheduler
answers with the writes since (``zarr_cache_sync``).  The worker applies each once (a
write may also come as a push, earlier or later), renews its lease from when the request
was sent, and, on its first catch-up, decides which files found on its disk may serve:
those the history vouches for, those that never change (snapshots), and the rest only
after a check against their source.  Under another scheduler's history, or when the
history up to its position is lost, it distrusts everything it holds.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.core.protocol import SyncReply, unpack
from dask_zarr_cache.identity.keys import is_immutable
from dask_zarr_cache.writes.log import Stamped, verify_files

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Follower", "catch_up"]

F = TypeVar("F", bound=Stamped)


class Follower(Protocol[F]):
    """What a catch-up needs of a worker's bookkeeping (``worker.state.LocalState``)."""

    @property
    def epoch(self) -> bytes | None:
        """Whose history the worker follows (``None`` before its first catch-up)."""
        ...

    def sync_position(self) -> tuple[bytes | None, int]:
        """Where the worker's history stands; before its first sync, its oldest file's."""
        ...

    def has_unverified(self) -> bool:
        """Whether files found on disk at start still wait for the history's verdict."""
        ...

    def take_unverified(self) -> list[F]:
        """Those files, handed over (none wait any more)."""
        ...

    def forget_all(self, seq: int) -> list[str]:
        """Distrust every file; the keys whose files must go."""
        ...

    def apply_write(
        self, epoch: bytes, seq: int, keys: Iterable[str], prefixes: Iterable[str]
    ) -> list[str]:
        """Apply write ``seq`` once; the keys whose files must go."""
        ...

    def adopt(self, files: Iterable[F], proven: bool = True) -> list[str]:
        """Serve files found on disk (``proven``) or keep them for a check of the source."""
        ...

    def synced(self, epoch: bytes, seq: int, sent_at: float) -> None:
        """Every write of ``epoch`` up to ``seq`` is applied; the lease runs from ``sent_at``."""
        ...


async def catch_up(
    scheduler: Any,
    worker: str,
    follower: Follower[F],
    timeout: float,
    clock: Clock,
) -> list[str]:
    """Catch ``worker`` up with the scheduler's write history, and renew its lease.

    Parameters
    ----------
    scheduler : rpc
        An rpc to the scheduler.
    worker : str
        The worker's address.
    follower : Follower
        The worker's bookkeeping.
    timeout : float
        Seconds to wait for the scheduler's answer.
    clock : callable
        Seconds (wall clock): the lease runs from when the request was sent.

    Returns
    -------
    list of str
        The keys whose files must be deleted.

    """
    epoch, seq = follower.sync_position()
    found_files = follower.has_unverified()
    sent_at = clock()
    raw = await asyncio.wait_for(
        scheduler.zarr_cache_sync(worker=worker, epoch=epoch, seq=seq, found_files=found_files),
        timeout,
    )
    if raw is None:  # a scheduler without the plugin
        return []
    reply = SyncReply(*unpack(raw))
    files = follower.take_unverified()
    doomed = []
    if reply.invalidations is None or follower.epoch not in (None, reply.epoch):
        doomed += follower.forget_all(reply.seq)  # the history is lost, or another's
    else:
        for seq, keys, prefixes in reply.invalidations:
            doomed += follower.apply_write(reply.epoch, seq, keys, prefixes)
    good, unknown, stale = verify_files(files, reply.epoch, reply.invalidations)
    snapshots = [f for f in unknown if is_immutable(f.key)]  # never change: no check
    to_check = [f for f in unknown if not is_immutable(f.key)]
    doomed += stale + follower.adopt(good + snapshots)
    doomed += follower.adopt(to_check, proven=False)  # see zarr_cache_apply_prove
    follower.synced(reply.epoch, reply.seq, sent_at)
    return doomed
