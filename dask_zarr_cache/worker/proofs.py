"""Checking files of an earlier cluster against their source, one listing per directory.

The write history vouches only for files read under the current scheduler.  A file from
before (another cluster on the same disks, or a history too short) is kept, not served,
until a listing of its source shows the object unchanged since the file's bytes were read:
the same size, and last modified at least ``margin`` seconds before the read began.  The
margin covers the clocks of the worker and of the storage service, and uploads that
started before the read and finished after it (S3 dates an object by its upload's start).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from dask_zarr_cache.core.loops import run_on, zarr_loop
from dask_zarr_cache.identity.keys import base_key
from dask_zarr_cache.identity.listing import SourceObject, list_directory

if TYPE_CHECKING:
    from zarr.abc.store import Store

    from dask_zarr_cache.worker.entries import LocalEntry

__all__ = ["check_against_source"]

logger = logging.getLogger(__name__)

#: Directory listings in flight at once per check.
LISTINGS_IN_FLIGHT = 8


async def check_against_source(
    entries: dict[str, LocalEntry], prefix: str, source: Store, margin: float, wait: float
) -> tuple[dict[str, LocalEntry], dict[str, LocalEntry]]:
    """Split ``entries`` (cache keys below ``prefix``, the key prefix of ``source``'s root).

    Returns the entries shown current and the rest.  A directory that cannot be listed
    shows nothing current.  The listings run on zarr's loop and wait up to ``wait``
    seconds for it to start them: no read waits on a check, so a loop slowed by load (not
    the one-second hop of a read) must not cost the files it would have shown current.
    """
    by_directory: dict[str, list[tuple[str, str, LocalEntry]]] = {}
    for key, entry in entries.items():
        directory, _, name = base_key(key)[len(prefix) :].rpartition("/")
        by_directory.setdefault(directory, []).append((key, name, entry))
    limit = asyncio.Semaphore(LISTINGS_IN_FLIGHT)

    async def listed(directory: str) -> dict[str, SourceObject] | None:
        async with limit:
            try:  # on zarr's loop, with the reads of the same store
                return await run_on(zarr_loop(), list_directory(source, directory), wait)
            except Exception as err:  # unreachable, forbidden, ...: nothing shown current
                logger.info("zarr cache: %r could not be listed: %r", directory, err)
                return None

    listings = await asyncio.gather(*(listed(d) for d in by_directory))
    current: dict[str, LocalEntry] = {}
    stale: dict[str, LocalEntry] = {}
    for rows, listing in zip(by_directory.values(), listings, strict=True):
        for key, name, entry in rows:
            found = None if listing is None else listing.get(name)
            whole = base_key(key) == key  # a byte range's entry has the range's size
            ok = (
                found is not None
                and found.modified is not None
                and entry.created > 0
                and found.modified <= entry.created - margin
                and (not whole or found.size == entry.size)
            )
            (current if ok else stale)[key] = entry
            if not ok:
                logger.debug("zarr cache: %r not shown current: %r, listed %r", key, entry, found)
    return current, stale
