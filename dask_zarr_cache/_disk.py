"""A worker's cache files: atomic writes, a checksum trailer, verified reads.

Each cached object is one file at ``<root>/<cache key>``.  The file holds the object's
bytes followed by a 16-byte trailer (magic, size, CRC32C) so that every file can be
verified on its own, by a read or after a worker restart, without a side index.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c

from dask_zarr_cache._exceptions import InvalidCacheKeyError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["CacheFile", "DiskCache", "checksum"]

_TRAILER = struct.Struct("<4sQI")
_MAGIC = b"DZC1"
_TMP_PREFIX = ".tmp-"


def checksum(data: bytes | memoryview) -> int:
    """CRC32C of ``data``: hardware accelerated (~17 GB/s here), no copy of memoryviews.

    The ``crc32c`` package rather than ``google-crc32c`` (zarr's): the latter accepts only
    ``bytes``, which cost a 4 MiB copy per peer transfer (received frames are memoryviews).
    """
    return crc32c.crc32c(data)


@dataclass(frozen=True, slots=True)
class CacheFile:
    """What a valid cache file holds: its key, payload size, checksum and write time."""

    key: str
    size: int
    checksum: int
    mtime: float


class DiskCache:
    """Cache files below one directory.

    Methods block on disk I/O; callers on an event loop run them in a thread.

    Parameters
    ----------
    root : str or Path
        Directory of this worker's cache. The first write creates it, so a directory that
        cannot be created shows up as that write's ``OSError``.

    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def path_of(self, key: str) -> Path:
        """Return the file of a cache key, refusing any path outside :attr:`root`.

        Raises
        ------
        InvalidCacheKeyError
            If the key is absolute, has ``..``/empty components or a NUL byte.

        """
        parts = key.split("/")
        if (
            not key
            or "\x00" in key
            or key.startswith("/")
            or any(p in ("", ".", "..") or p.startswith(_TMP_PREFIX) for p in parts)
        ):
            raise InvalidCacheKeyError(f"cache key {key!r} would leave the cache directory")
        return self.root.joinpath(*parts)

    def write(self, key: str, data: bytes | memoryview) -> int:
        """Write ``data`` under ``key`` atomically (temp file + rename); return its checksum.

        Raises
        ------
        OSError
            If the disk is full, read-only, or the path is taken by a directory.

        """
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        crc = checksum(data)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(_TRAILER.pack(_MAGIC, len(data), crc))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return crc

    def read(self, key: str, expected_checksum: int | None = None) -> memoryview | None:
        """Return the verified bytes of ``key``, or ``None`` if missing or corrupt.

        The bytes come back as a read-only memoryview of the file's contents (no copy).

        A corrupt file (bad trailer, wrong size, checksum mismatch with the trailer or with
        ``expected_checksum``) is deleted, so the caller fetches the object again.
        """
        path = self.path_of(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # unreadable (EIO, permissions, a directory): not usable, drop it
            raw = b""
        verified = _verified_payload(raw, expected_checksum)
        if verified is None:
            with contextlib.suppress(OSError):
                self.delete(key)
            return None
        return verified[0]

    def delete(self, key: str) -> int:
        """Delete the file of ``key``; return the bytes freed (0 if it was not there)."""
        path = self.path_of(key)
        try:
            size = path.stat().st_size - _TRAILER.size
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return 0
        return max(size, 0)

    def scan(self) -> Iterator[CacheFile]:
        """Yield every valid cache file below :attr:`root`; delete invalid and temp files.

        Each file is read in full and its checksum verified before it is trusted.
        """
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = Path(dirpath, name)
                if name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                key = path.relative_to(self.root).as_posix()
                try:
                    raw = path.read_bytes()
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                verified = _verified_payload(raw, None)
                if verified is None:
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                payload, crc = verified
                yield CacheFile(key, len(payload), crc, mtime)


def _verified_payload(raw: bytes, expected_checksum: int | None) -> tuple[memoryview, int] | None:
    """The payload of a file's bytes and its checksum, or ``None`` if anything is off."""
    if len(raw) < _TRAILER.size:
        return None
    magic, size, crc = _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
    if magic != _MAGIC or size != len(raw) - _TRAILER.size:
        return None
    if expected_checksum is not None and crc != expected_checksum:
        return None
    payload = memoryview(raw)[:size]  # no copy
    return (payload, crc) if checksum(payload) == crc else None
