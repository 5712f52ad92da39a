"""What a source says of its objects in bulk: one listing per directory, size and time.

A cache file of an earlier cluster is current if the source's object has the file's size
and was last modified before the file's bytes were read (with a margin for clocks):
:func:`list_directory` gets both for every object of one directory in one request where
the store allows (one LIST per 1,000 objects on S3, GCS and Azure; a ``scandir`` on local
disks).
"""

from __future__ import annotations

import asyncio
import datetime
import os
from dataclasses import dataclass
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, WrapperStore

__all__ = ["SourceObject", "list_directory"]


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One object as a listing of its source describes it."""

    size: int
    modified: float | None  #: last modification, seconds since the epoch (``None``: unknown)


async def list_directory(store: Store, directory: str) -> dict[str, SourceObject] | None:
    """The objects directly in zarr key directory ``directory`` of ``store``, by name.

    ``None`` if this kind of store cannot be listed with sizes and times (then nothing of
    it can be shown current).
    """
    while isinstance(store, WrapperStore):
        store = store._store
    if isinstance(store, LocalStore):
        return await asyncio.to_thread(_scan, os.path.join(str(store.root), directory))
    if isinstance(store, FsspecStore):
        return await _list_fsspec(store, directory)
    if type(store).__name__ == "ObjectStore" and hasattr(store, "store"):
        return await _list_obstore(store.store, directory)
    return None


def _scan(path: str) -> dict[str, SourceObject]:
    try:
        with os.scandir(path) as found:
            return {
                e.name: SourceObject(s.st_size, s.st_mtime)
                for e in found
                if e.is_file() and (s := e.stat())
            }
    except FileNotFoundError:
        return {}


async def _list_fsspec(store: FsspecStore, directory: str) -> dict[str, SourceObject]:
    path = f"{store.path.rstrip('/')}/{directory}".rstrip("/")
    store.fs.invalidate_cache(path)  # s3fs keeps listings: this one must be fresh
    try:
        infos = await store.fs._ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: SourceObject(
            int(info.get("size") or 0), _modified(info)
        )
        for info in infos
        if info.get("type") == "file"
    }


async def _list_obstore(store: Any, directory: str) -> dict[str, SourceObject]:
    import obstore

    listing = await obstore.list_with_delimiter_async(store, prefix=directory or None)
    return {
        o["path"].rsplit("/", 1)[-1]: SourceObject(int(o["size"]), _seconds(o["last_modified"]))
        for o in listing["objects"]
    }


def _modified(info: dict[str, Any]) -> float | None:
    """The modification time of an fsspec listing entry, whichever file system made it."""
    for name in ("LastModified", "last_modified", "mtime", "updated", "modified"):
        if info.get(name) is not None:
            return _seconds(info[name])
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _seconds(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None
