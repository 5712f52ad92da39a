"""Peer transfer: asking another worker for an object, and answering such requests.

Bytes travel as ``to_serialize(memoryview)`` (one frame, no copy) with their CRC32C,
which the receiver verifies.  A peer serves only what it holds now, or the result of its
fetch from the source in flight (cluster-wide single-flight), and only while it may serve
at all (see ``LocalState.can_serve``).  It never forwards a wait: asked for a key its own
load is asking another peer for, it answers "missing" at once.  Each reply carries the
peer's position in the write history, and the asker refuses bytes older than a write it
has applied itself (``LocalState.current``): an invalidation can reach the peer after it
reached the asker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from distributed.metrics import context_meter
from distributed.protocol import to_serialize

from dask_zarr_cache.core.clock import Clock
from dask_zarr_cache.core.departures import Departures
from dask_zarr_cache.core.exceptions import IndexUnavailableError
from dask_zarr_cache.core.loops import LoopBlockedError, WorkerLoop
from dask_zarr_cache.worker.disk import checksum
from dask_zarr_cache.worker.flights import SOURCE

if TYPE_CHECKING:
    from collections.abc import Callable

    from dask_zarr_cache.core.protocol import Payload
    from dask_zarr_cache.worker.disk import DiskCache
    from dask_zarr_cache.worker.entries import LocalEntry
    from dask_zarr_cache.worker.state import LocalState

__all__ = [
    "ABSENT",
    "FETCHING",
    "MISSING",
    "OK",
    "UNAVAILABLE",
    "Peers",
    "read_cached",
    "read_file",
]

logger = logging.getLogger(__name__)

#: Answers of ``zarr_cache_get``: bytes follow; the source has no such key; not served.
OK, ABSENT, MISSING = "ok", "absent", "missing"
#: Answer to a probe: alive, and reading the key from the source now (ask again, and wait).
FETCHING = "fetching"
#: What makes the cache give up on the index or a peer and read the source instead.
UNAVAILABLE = (IndexUnavailableError, LoopBlockedError, OSError, TimeoutError)


class Peers:
    """One worker's side of peer transfers.

    Parameters
    ----------
    state : LocalState
        This worker's bookkeeping.
    disk : DiskCache
        This worker's files.
    rpc : callable
        ``rpc(address)`` to a peer, usable on the worker's loop.
    worker_loop : WorkerLoop
        The worker's event loop, where requests to peers run.
    read_timeout : float
        Seconds this worker serves a peer's request at most (waiting for its own fetch).
    clock : callable
        Seconds (the worker's clock): how long a request took.
    stall : float
        A request that timed out this much later than asked was late because this worker
        stood still (frozen, or its loop blocked), not because the peer did: the peer is
        not blamed (``loop_wait``).

    """

    def __init__(
        self,
        state: LocalState,
        disk: DiskCache,
        rpc: Callable[[str], Any],
        worker_loop: WorkerLoop,
        read_timeout: float,
        clock: Clock,
        stall: float,
    ) -> None:
        self.state, self.disk, self.rpc, self.worker_loop = state, disk, rpc, worker_loop
        self.read_timeout = read_timeout
        self.clock = clock
        self.stall = stall
        self._calls = Departures()  # by peer address

    def host_left(self, address: str) -> None:
        """Peer ``address`` left: the requests still waiting on it fail now."""
        self._calls.left(lambda a: a == address, "it left the cluster")

    async def fetch(
        self, address: str, key: str, timeout: float, full: float | None = None
    ) -> tuple[str, Payload | None]:
        """Ask peer ``address`` for ``key`` (from any loop), waiting at most ``timeout``.

        Returns ``(OK, bytes)``, ``(ABSENT, None)`` if the source has no such key, or
        ``(MISSING, None)`` if the peer could not serve it, or served what may predate a
        write this worker applied (a peer that did not answer is not asked again for a
        while).  With ``full`` (more than ``timeout``: a probe of a peer in back-off), the
        peer answers at once; one that is reading ``key`` from the source says so, and is
        asked again, for ``full`` seconds in all: slow is not gone.
        """
        probe = full is not None and full > timeout
        started = self.clock()
        with self.state.timed("peer_wait_us"):
            try:
                reply = await self.worker_loop.call(self.request(address, key, timeout, probe))
            except UNAVAILABLE as err:
                late = self.clock() - started - timeout
                logger.debug("zarr cache peer %s failed for %s: %r", address, key, err)
                if isinstance(err, TimeoutError) and late > self.stall:
                    logger.debug(
                        "zarr cache: the timeout came %.1f s late: not %s's fault", late, address
                    )
                elif not isinstance(err, LoopBlockedError):
                    self.state.peer_failed(address, probe)
                return MISSING, None
        self.state.peer_answered(address)
        # A peer without the cache's handlers (just restarted) answers None.
        status = reply.get("status") if isinstance(reply, dict) else None
        if probe and status == FETCHING and full is not None:
            return await self.fetch(address, key, full - (self.clock() - started))
        if status not in (OK, ABSENT):
            return MISSING, None
        if not self.state.current(key, reply.get("epoch"), reply.get("seq")):
            # The peer had not applied a write this worker applied to key: its bytes (or
            # its "absent") may be what the write replaced.
            self.state.count(stale_refused=1)
            return MISSING, None
        if status == ABSENT:
            return ABSENT, None
        data = reply["data"]
        if checksum(data) != reply["checksum"]:
            logger.warning("zarr cache peer %s sent corrupt bytes for %s", address, key)
            return MISSING, None
        context_meter.digest_metric("zarr-cache-peer-bytes", len(data), "bytes")
        self.state.served_by(key, address, len(data))
        return OK, data

    async def request(self, address: str, key: str, timeout: float, probe: bool = False) -> Any:
        """The raw ``zarr_cache_get`` reply of ``address`` (worker loop).

        Raises
        ------
        OSError
            If the peer cannot be reached, or left meanwhile.
        TimeoutError
            If it did not answer within ``timeout`` (a frozen peer).

        """
        call = self.rpc(address).zarr_cache_get(key=key, probe=probe)
        return await self._calls.call(address, call, max(0.0, timeout))

    async def serve(self, key: str, probe: bool = False) -> dict[str, Any]:
        """Handler ``zarr_cache_get``: a cached object, or its fetch in flight, to a peer.

        Only keys in this cache are served; anything else gets ``{"status": "missing"}``.
        Bytes (and "absent") come with this worker's position in the write history when
        it looked the key up, so the asker can tell whether they predate a write it knows.
        A ``probe`` is answered at once: ``{"status": "fetching"}`` while this worker
        reads ``key`` from the source.
        """
        if not self.state.can_serve():
            return {"status": MISSING}
        epoch, seq = self.state.position()  # before the lookup: the file is current up to it
        fetch = self.state.inflight(key)
        if probe and fetch is not None and fetch.phase == SOURCE and not fetch.future.done():
            return {"status": FETCHING}
        if fetch is not None:
            # Only a load that reads the source is waited on: one waiting on a peer itself
            # answers "missing" at once (peers naming each other would wait on each other).
            try:
                data = await asyncio.wait_for(fetch.source_outcome(), self.read_timeout)
            except Exception:
                return {"status": MISSING}
            if data is None:
                return {"status": ABSENT, "epoch": epoch, "seq": seq}
            return self._reply(key, data, checksum(data), epoch, seq)
        found = await read_cached(self.state, self.disk, key)
        if found is None:
            return {"status": MISSING}
        return self._reply(key, *found, epoch, seq)

    def _reply(
        self, key: str, data: Payload, crc: int, epoch: bytes | None, seq: int
    ) -> dict[str, Any]:
        self.state.record_served(key, len(data))
        return {
            "status": OK,
            "data": to_serialize(data),
            "checksum": crc,
            "epoch": epoch,
            "seq": seq,
        }


async def read_cached(state: LocalState, disk: DiskCache, key: str) -> tuple[Payload, int] | None:
    """Return the worker's verified copy of ``key`` and its checksum, or ``None``.

    From memory if a copy is kept there, else from its file (then a small one is kept in
    memory).  An expired entry, or one whose file is gone or damaged, is forgotten on the
    way.
    """
    entry, expired, copy = state.find(key)
    if entry is None:
        await read_file(state, disk, key, entry, expired)
        return None
    if copy is not None:
        return copy, entry.checksum
    data = await read_file(state, disk, key, entry, expired)
    if data is None:
        return None
    state.remember(key, entry, data)
    return data, entry.checksum


async def read_file(
    state: LocalState, disk: DiskCache, key: str, entry: LocalEntry | None, expired: bool
) -> Payload | None:
    """The bytes of ``entry``'s file, verified against its checksum, or ``None``.

    ``entry`` and ``expired`` are what :meth:`LocalState.find` said of ``key``: the file
    of an entry that just expired is deleted, and an entry whose file is gone or damaged
    is forgotten.
    """
    if expired:
        await asyncio.to_thread(disk.delete, key)
    if entry is None:
        return None
    data = await asyncio.to_thread(disk.read, key, entry.checksum)
    if data is None:
        state.remove_copy(key, entry.tag)
    return data
