"""How workers and the scheduler reach the index shards: one typed method per operation.

The index is split into shards by key hash (:mod:`~dask_zarr_cache.index.digests`), each
hosted by a worker (:mod:`~dask_zarr_cache.index.host`).  The scheduler knows where they
live (``zarr_cache_index``); callers ask it, then call each shard's host directly, one
handler per operation.
Operations on keys are split by shard, the parts sent concurrently; others go to every
shard.  A failed call makes its caller forget that shard's location only and ask again
(how callers find a shard re-created elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

import dask.config
from dask.utils import parse_timedelta

from dask_zarr_cache.core.departures import Departures
from dask_zarr_cache.core.exceptions import IndexUnavailableError
from dask_zarr_cache.core.protocol import (
    FETCH,
    NOBODY,
    CommitReply,
    Decision,
    Item,
    Unreachable,
    pack,
    unpack,
)
from dask_zarr_cache.index.coalescing import Coalescer
from dask_zarr_cache.index.digests import group_by_shard, key_digest, shard_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable, Iterable

__all__ = ["REGISTER_BATCH", "IndexClient"]

#: Files per ``register`` message: a worker with many files sends them in parts, one
#: part in flight at a time, so re-filling a shard never blocks it for long.
REGISTER_BATCH = 10_000

Location = dict[str, str]
R = TypeVar("R")
_ACQUIRE, _COMMIT = "acquire", "commit"  # what a caller of the coalesced exchange asks


class IndexClient:
    """Calls the cluster's index shards, on behalf of one worker (or of the scheduler).

    Parameters
    ----------
    worker : str
        Address of the worker calling (``""`` for the scheduler).
    scheduler : rpc
        An rpc to the scheduler (``worker.scheduler``), or ``None`` when ``locate`` is
        given.
    rpc : callable
        Connection pool: ``rpc(address)`` returns an rpc to a worker.
    on_connect : callable, optional
        Coroutine function ``on_connect(client, shard)`` run once per newly found shard,
        before any other call reaches it (a worker registers its files there).
    locate : callable, optional
        Coroutine function returning the location (``{"address", "key"}`` or ``None``) of
        every shard, or ``None``; defaults to asking the scheduler.

    """

    def __init__(
        self,
        worker: str,
        scheduler: Any,
        rpc: Callable[[str], Any],
        on_connect: Callable[[IndexClient, int], Awaitable[None]] | None = None,
        locate: Callable[[], Awaitable[list[Location | None] | None]] | None = None,
    ) -> None:
        self.worker = worker
        self._scheduler = scheduler
        self._rpc = rpc
        self._on_connect = on_connect
        self._locate = locate or self._ask_scheduler
        self._locations: list[Location | None] = []  # per shard; [] until the layout is known
        self._locks: dict[int, asyncio.Lock] = {}
        self._connecting: dict[int, Location] = {}
        self._exchanging = Coalescer(self._send_exchange, self._give_back)
        self._calls = Departures()  # by (shard, host address, shard name)
        self.timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))

    @property
    def shards(self) -> int:
        """Number of index shards (as last learned; 1 before)."""
        return len(self._locations) or 1

    @property
    def connected(self) -> bool:
        """Whether every shard's location is known (and, for workers, registered with)."""
        return bool(self._locations) and None not in self._locations

    def moved(self, shard: int | None = None) -> None:
        """A shard (or all) was created anew: forget it, and fail the calls still waiting on it.

        Calls to a dead worker wait for the connect timeout (distributed retries refused
        connections): the readers behind them fall back to the source now instead.
        """
        self.reset(shard)
        self._calls.left(lambda d: shard is None or d[0] == shard, "the shard moved")

    def host_left(self, address: str) -> None:
        """Worker ``address`` left: forget the shards it hosted, fail the calls to them now."""
        for shard, location in enumerate(self._locations):
            if location is not None and location["address"] == address:
                self._locations[shard] = None
        self._calls.left(lambda d: d[1] == address, "its worker left")

    def reset(self, shard: int | None = None) -> None:
        """Forget one shard's location (or all, and the layout); the next call asks again."""
        if shard is None:
            self._locations = []
        elif shard < len(self._locations):
            self._locations[shard] = None

    # -- operations on keys: split by shard ----------------------------------------------
    async def acquire(
        self, keys: Iterable[str], unreachable: Unreachable = NOBODY
    ) -> list[Decision]:
        """Decide how this worker gets each of ``keys`` (see ``CacheIndex.acquire``)."""

        async def ask(shard: int, part: list[str]) -> list[Decision]:
            return (await self._exchange(shard, part, unreachable, []))[0]

        return await self._per_key(list(keys), ask)

    async def commit(self, items: Iterable[Item]) -> CommitReply:
        """Record objects this worker now holds (see ``CacheIndex.commit``)."""
        groups = group_by_shard(items, await self.shard_count(), itemgetter(0))
        replies = await self._fan_out(
            {s: self._exchange(s, [], NOBODY, part) for s, part in groups.items()}
        )
        return CommitReply([key for _, rejected in replies.values() for key in rejected])

    async def acquire_one(self, key: str, unreachable: Unreachable = NOBODY) -> Decision:
        """Decide for one key; concurrent calls share one message per shard.

        Keys asked in one loop iteration go together (zarr reads the chunks of a selection
        concurrently), and keys asked while a message to their shard is in flight go
        together in the next (:class:`~dask_zarr_cache.index.coalescing.Coalescer`), with
        the commits waiting for that shard.
        """
        slot = (shard_of(key, await self.shard_count()), unreachable)
        return await self._exchanging.submit(slot, (_ACQUIRE, key))

    async def commit_one(self, item: Item) -> CommitReply:
        """Commit one object, in the next message to its shard (see :meth:`acquire_one`)."""
        slot = (shard_of(item.key, await self.shard_count()), NOBODY)
        return await self._exchanging.submit(slot, (_COMMIT, item))

    async def _exchange(
        self, shard: int, keys: list[str], unreachable: Unreachable, items: list[Item]
    ) -> tuple[list[Decision], list[str]]:
        """One message to ``shard``: commit ``items``, then decide for ``keys``.

        Returns the decisions and the keys of the items the shard rejected.  In a cold
        scan every fetch ends in a commit; riding with the next acquire, commits cost
        the shard no message of their own.
        """
        reply = await self._call(
            shard,
            "zarr_cache_index_exchange",
            worker=self.worker,
            digests=_digests(keys),
            unreachable=list(unreachable),
            commits=_rows(items),
        )
        decisions, rejected = unpack(reply)
        return [Decision(*d) for d in decisions], [items[i].key for i in rejected]

    async def _send_exchange(self, slot: Hashable, values: list[tuple[str, Any]]) -> list[Any]:
        shard, unreachable = cast("tuple[int, tuple[str, int]]", slot)
        keys = [v for kind, v in values if kind == _ACQUIRE]
        items = [v for kind, v in values if kind == _COMMIT]
        decisions, rejected = await self._exchange(shard, keys, unreachable, items)
        answers, refused = iter(decisions), set(rejected)
        return [
            next(answers) if kind == _ACQUIRE else CommitReply([v.key] if v.key in refused else [])
            for kind, v in values
        ]

    async def _give_back(self, slot: Hashable, orphans: list[tuple[Any, Any]]) -> None:
        """Claims taken for callers cancelled meanwhile are abandoned."""
        keys = [v for (kind, v), answer in orphans if kind == _ACQUIRE and answer.kind == FETCH]
        with contextlib.suppress(IndexUnavailableError):
            await self.abandon(keys)

    async def abandon(self, keys: Iterable[str]) -> None:
        """Give up this worker's pending claims of ``keys``."""
        keys = list(keys)
        if not keys:
            return
        groups = group_by_shard(keys, await self.shard_count(), str)
        await self._fan_out(
            {
                s: self._call(
                    s, "zarr_cache_index_abandon", worker=self.worker, digests=_digests(g)
                )
                for s, g in groups.items()
            }
        )

    async def touch(self, dropped: Iterable[Item], everywhere: bool = False) -> bool:
        """Report copies this worker deleted (see ``CacheIndex.touch``); whether all knew it.

        Goes to the shards concerned, the shards this worker is not connected to (which
        registers it there) and, if ``everywhere``, to all.  A shard that does not know the
        worker is forgotten, so the next call registers again.
        """
        shards = await self.shard_count()
        by_shard = group_by_shard(dropped, shards, itemgetter(0))
        targets = (
            range(shards)
            if everywhere
            else {
                *by_shard,
                *(s for s in range(shards) if self._location(s) is None),
            }
        )
        replies = await self._fan_out(
            {
                s: self._call(
                    s,
                    "zarr_cache_index_touch",
                    worker=self.worker,
                    dropped=_rows(by_shard.get(s, [])),
                )
                for s in targets
            },
            partial=True,
        )
        for shard, known in replies.items():
            if not known:
                self.reset(shard)
        return all(replies.values())

    async def register(self, shard: int, files: Iterable[Item]) -> list[str]:
        """Tell ``shard`` which of this worker's ``files`` are its keys; returns keys to delete.

        ``files`` may be all of the worker's: only those of ``shard`` are sent, in parts of
        at most :data:`REGISTER_BATCH`, one after the other.
        """
        mine = [f for f in files if shard_of(f.key, self.shards) == shard]
        return await self._send_in_parts(shard, "zarr_cache_index_register", mine, marked=True)

    async def add(self, files: Iterable[Item]) -> list[str]:
        """Tell the shards of ``files`` that this worker holds them too; returns keys to delete.

        Unlike :meth:`register`, the worker's other entries stay: for files a check of the
        source made servable.  Each shard gets parts of at most :data:`REGISTER_BATCH`.
        """
        groups = group_by_shard(files, await self.shard_count(), itemgetter(0))
        replies = await self._fan_out(
            {s: self._send_in_parts(s, "zarr_cache_index_add", g) for s, g in groups.items()}
        )
        return [key for keys in replies.values() for key in keys]

    async def _send_in_parts(
        self, shard: int, op: str, files: list[Item], marked: bool = False
    ) -> list[str]:
        """Send ``files`` to ``shard``'s ``op`` in parts of :data:`REGISTER_BATCH`, in turn.

        ``marked``: each part says whether it is the ``first`` and the ``last`` (a
        registration replaces the worker's entries; at least one part is sent).  Returns
        the keys the shard's replies (positions in a part) say to delete.
        """
        parts = [files[i : i + REGISTER_BATCH] for i in range(0, len(files), REGISTER_BATCH)]
        if marked:
            parts = parts or [[]]
        to_delete: list[str] = []
        for n, part in enumerate(parts):
            marks = {"first": n == 0, "last": n == len(parts) - 1} if marked else {}
            reply = await self._call(shard, op, worker=self.worker, files=_rows(part), **marks)
            to_delete += [part[i].key for i in unpack(reply)]
        return to_delete

    async def invalidate(self, keys: Iterable[str]) -> int:
        """Forget written keys (see ``CacheIndex.invalidate``); returns entries dropped."""
        groups = group_by_shard(keys, await self.shard_count(), str)
        replies = await self._fan_out(
            {
                s: self._call(s, "zarr_cache_index_invalidate", digests=_digests(g))
                for s, g in groups.items()
            }
        )
        return sum(replies.values())

    async def cached(self, keys: list[str]) -> list[bool]:
        """Whether each key is cached on some worker."""

        async def ask(shard: int, part: list[str]) -> list[bool]:
            return unpack(
                await self._call(shard, "zarr_cache_index_cached", digests=_digests(part))
            )

        return await self._per_key(keys, ask)

    # -- operations on every shard -----------------------------------------------------------
    async def remove_worker(self, worker: str) -> int:
        """Forget a departed worker's entries and claims."""
        replies = await self._fan_out(
            {
                s: self._call(s, "zarr_cache_index_remove_worker", worker=worker)
                for s in range(await self.shard_count())
            }
        )
        return sum(replies.values())

    async def configure(self, max_age_seconds: float | None, policy: str) -> None:
        """Apply a new TTL and replacement policy."""
        shards = await self.shard_count()
        await self._fan_out(
            {
                s: self._call(
                    s, "zarr_cache_index_configure", max_age_seconds=max_age_seconds, policy=policy
                )
                for s in range(shards)
            }
        )

    async def summary(self) -> dict[str, Any]:
        """Entries, pending fetches and entries per worker, over the shards that answer.

        See :func:`index_summary`.
        """
        shards = await self.shard_count()
        replies = await self._fan_out(
            {s: self._call(s, "zarr_cache_index_summary") for s in range(shards)}, partial=True
        )
        locations = [self._location(s) for s in range(shards)]
        addresses = [None if at is None else at["address"] for at in locations]
        return index_summary(replies, addresses)

    # -- plumbing --------------------------------------------------------------------------
    async def shard_count(self) -> int:
        """Number of index shards, asking the scheduler if not known yet."""
        if not self._locations:
            await self._ask_layout()
        return len(self._locations)

    async def _per_key(
        self, keys: list[str], ask: Callable[[int, list[str]], Awaitable[list[R]]]
    ) -> list[R]:
        """``ask(shard, part)`` each shard for its part of ``keys``; answers in key order."""
        groups = group_by_shard(range(len(keys)), await self.shard_count(), keys.__getitem__)
        replies = await self._fan_out(
            {s: ask(s, [keys[i] for i in group]) for s, group in groups.items()}
        )
        answers: list[Any] = [None] * len(keys)
        for shard, group in groups.items():
            for i, answer in zip(group, replies[shard], strict=True):
                answers[i] = answer
        return answers

    async def _fan_out(
        self, calls: dict[int, Awaitable[Any]], partial: bool = False
    ) -> dict[int, Any]:
        """Await one call per shard; replies by shard.

        Every call runs to its end.  A failed shard raises (after the others finished),
        unless ``partial``: then failed shards are left out, and only all failing raises.
        """
        shards = list(calls)
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        replies, errors = {}, []
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                replies[shard] = result
        if errors and (not partial or not replies):
            raise errors[0]
        return replies

    def _location(self, shard: int) -> Location | None:
        return self._locations[shard] if shard < len(self._locations) else None

    async def _call(self, shard: int, handler: str, **kwargs: Any) -> Any:
        """Call the index handler ``handler(**kwargs)`` of ``shard``; return its reply.

        Raises
        ------
        IndexUnavailableError
            If the shard does not exist, was lost, or did not answer within the timeout.

        """
        location = self._connecting.get(shard)  # calls of on_connect reach the new shard
        if location is None:
            location = await self._ensure_location(shard)
        try:
            return await self._execute(shard, location, handler, kwargs)
        except IndexUnavailableError:
            if self._location(shard) is location:
                self._locations[shard] = None
            raise

    async def _ensure_location(self, shard: int) -> Location:
        location = self._location(shard)
        if location is not None:
            return location
        async with self._locks.setdefault(shard, asyncio.Lock()):
            if self._location(shard) is None:
                layout = await self._ask_layout()
                location = layout[shard] if shard < len(layout) else None
                if location is None:
                    raise IndexUnavailableError(f"zarr cache index shard {shard} does not exist")
                if self._on_connect is not None:
                    self._connecting[shard] = location
                    try:
                        await self._on_connect(self, shard)
                    finally:
                        del self._connecting[shard]
                if len(self._locations) != len(layout):
                    raise IndexUnavailableError("the zarr cache index changed its shard count")
                self._locations[shard] = location
            return cast("Location", self._locations[shard])

    async def _ask_layout(self) -> list[Location | None]:
        """Ask where the shards are; a new shard count resets every location."""
        try:
            layout = await asyncio.wait_for(self._locate(), self.timeout)
        except (TimeoutError, OSError) as err:
            raise IndexUnavailableError(f"scheduler did not answer: {err}") from err
        if not layout:
            raise IndexUnavailableError("the zarr cache index does not exist (yet)")
        if len(layout) != len(self._locations):
            self._locations = [None] * len(layout)
        return layout

    async def _ask_scheduler(self) -> list[Location | None] | None:
        return await self._scheduler.zarr_cache_index()

    async def _execute(
        self, shard: int, location: Location, handler: str, kwargs: dict[str, Any]
    ) -> Any:
        address, key = location["address"], location["key"]
        call = getattr(self._rpc(address), handler)(shard=key, **kwargs)
        try:
            return await self._calls.call((shard, address, key), call, self.timeout)
        except Exception as err:  # unreachable, gone, or the host has no such shard
            raise IndexUnavailableError(f"index at {address}: {err!r}") from err


def _digests(keys: Iterable[str]) -> bytes:
    """Keys as the index names them (computed here, so shards spend no time on it)."""
    return pack([key_digest(k) for k in keys])


def _rows(items: Iterable[Item]) -> bytes:
    """Copies as the index knows them: ``(digest, tag)``."""
    return pack([(key_digest(i.key), i.tag) for i in items])


#: Counters of each shard since it started, summed over shards.
_SUMMED = ("decisions", "asks")


def index_summary(
    replies: dict[int, dict[str, Any]], addresses: list[str | None]
) -> dict[str, Any]:
    """Add up the shards' ``zarr_cache_index_summary`` replies (by shard; missing: no answer).

    Returns ``entries``, ``pending``, ``decisions`` (keys the shards decided how to get,
    since they started), ``asks`` (the messages that asked for them), ``workers`` (entries
    per worker) and ``shards``: each shard's ``{"address", "entries", "pending",
    "decisions", "asks", "nbytes"}``, ``None`` if it did not answer.
    """
    workers: dict[str, dict[str, int]] = {}
    for reply in replies.values():
        for worker, numbers in reply["workers"].items():
            total = workers.setdefault(worker, dict.fromkeys(numbers, 0))
            for name, value in numbers.items():
                total[name] += value
    shards: list[dict[str, Any] | None] = [None] * len(addresses)
    for shard, reply in replies.items():
        numbers = {k: reply[k] for k in ("entries", "pending", *_SUMMED, "nbytes")}
        shards[shard] = {"address": addresses[shard], **numbers}
    return {
        "entries": sum(r["entries"] for r in replies.values()),
        "pending": sum(r["pending"] for r in replies.values()),
        **{k: sum(r[k] for r in replies.values()) for k in _SUMMED},
        "workers": workers,
        "shards": shards,
    }
