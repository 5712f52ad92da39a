"""A worker's cache files: hashed names, atomic writes, self-describing verified files.

Layout of a cache directory::

    <root>/DASK-ZARR-CACHE     marker: this directory belongs to the cache (JSON)
    <root>/.lock               held (flock) by the one process using the directory
    <root>/objects/ab/cdef...  one file per object, named by the SHA-256 of its cache key
    <root>/tmp/<uuid>          files being written (renamed into objects/ when complete)

The directory and its files are private to the worker's user and checked before use
(:mod:`~dask_zarr_cache.worker.private_dir`); files are reached relative to open directories,
never through a symlink.  File names are hashes, so no key can collide with another
(``a`` vs ``a/b``), exceed a name limit or leave the directory, whatever its characters.
Each file ends with its own key and a footer (sizes, CRC32C of the payload, the write's
epoch and sequence number, when the source was read, and a CRC of the footer), so a file
is verified on its own: a file moved, swapped or damaged on disk is never served, and
never as another key.  The
cache only ever deletes its user's files inside ``objects/`` and ``tmp/`` of a directory
that carries its marker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c

from dask_zarr_cache.core.exceptions import CacheDirectoryError
from dask_zarr_cache.worker.private_dir import PrivateDirectory

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["CacheFile", "DiskCache", "checksum", "is_disk_failure"]

logger = logging.getLogger(__name__)

MARKER = "DASK-ZARR-CACHE"
_FORMAT = 3
#: magic, key length, payload size, write sequence, payload CRC32C, epoch, time the source
#: was read (wall clock), footer CRC32C
_FOOTER = struct.Struct("<4sIQQI16sdI")
_MAGIC = b"DZC3"
#: errno values that say the disk itself is in trouble, not this one object.
_DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT}
)


#: Descriptors holding directory locks. A process forked from a task closes its copies, so
#: the lock goes with the worker that took it, not with a child that outlives it.
_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def checksum(data: bytes | memoryview) -> int:
    """CRC32C of ``data``: hardware accelerated (~17 GB/s here), no copy of memoryviews.

    The ``crc32c`` package rather than ``google-crc32c`` (zarr's): the latter accepts only
    ``bytes``, which cost a 4 MiB copy per peer transfer (received frames are memoryviews).
    """
    return crc32c.crc32c(data)


def is_disk_failure(err: OSError) -> bool:
    """Whether a failed write says the disk is unusable (full, read-only, gone, ...)."""
    return err.errno in _DISK_ERRNOS


def _encode_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class CacheFile:
    """What a valid cache file holds besides its payload."""

    key: str
    size: int
    checksum: int
    epoch: bytes  #: 16 bytes: which scheduler's write history ``seq`` counts in
    seq: int  #: writes of that history known when the object was read from the source
    mtime: float
    #: Wall-clock time the source read started (0.0: unknown), for checks against the source.
    fetched_at: float = 0.0


class DiskCache:
    """Cache files below one directory, private to this user (see :mod:`._private_dir`).

    Methods block on disk I/O; callers on an event loop run them in a thread.  Every
    file is reached relative to the open directories, never through a symlink.

    Parameters
    ----------
    root : str or Path
        Directory of this worker's cache.
    file_mode : int
        Mode of cache files (``0o600``: this user only); directories get the matching
        search bits.
    trusted_parent : bool
        Accept a parent directory that other users may write to (no sticky bit).

    """

    def __init__(
        self, root: str | os.PathLike[str], file_mode: int = 0o600, trusted_parent: bool = False
    ) -> None:
        self.root = Path(root).absolute()
        self._dir = PrivateDirectory(self.root, file_mode, trusted_parent)
        self._objects: int | None = None  # open directory fds, once claimed
        self._tmp: int | None = None
        self._lock_file: int | None = None

    # -- ownership ---------------------------------------------------------------------
    def open(self) -> None:
        """Claim the directory: check it, create or recognise it, lock it against others.

        Raises
        ------
        CacheDirectoryError
            If the directory or its parent is not safe to use (another user's, writable
            by others, symlinks where directories belong, files of another user's), if
            it holds files but no cache marker (it is somebody's data: the cache will not
            adopt or delete anything there), or if another process uses it.  Nothing in
            it was written or deleted.
        OSError
            If it cannot be created or locked (the disk is unusable).

        """
        root = self._dir.open()
        try:
            names = set(os.listdir(root))
            if MARKER not in names and names:
                raise CacheDirectoryError(
                    f"{self.root} is not empty and is not a dask-zarr-cache directory; "
                    "refusing to use it (nothing there was touched)"
                )
            self._dir.verify_tree(root)  # before anything is written there
            if MARKER not in names:
                fd = self._dir.create_file(root, MARKER)
                with os.fdopen(fd, "w") as marker:
                    marker.write(json.dumps({"format": _FORMAT}))
            fd = self._dir.open_file(root, ".lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CacheDirectoryError(
                    f"{self.root} is in use by another worker; each worker needs its own"
                ) from None
            self._lock_file = fd
            _LOCKS.add(fd)
            self._objects = self._dir.open_dir(root, "objects", create=True)
            self._tmp = self._dir.open_dir(root, "tmp", create=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory lock and close the directories (files stay)."""
        if self._lock_file is not None:
            _LOCKS.discard(self._lock_file)
            os.close(self._lock_file)  # closing the descriptor drops the flock
            self._lock_file = None
        for fd in (self._objects, self._tmp):
            if fd is not None:
                os.close(fd)
        self._objects = self._tmp = None
        self._dir.close()

    # -- objects -------------------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        """The file of a cache key (a hash of it: inside :attr:`root` by construction)."""
        shard, name = _name_of(key)
        return self.root / "objects" / shard / name

    def write(
        self, key: str, data: bytes | memoryview, epoch: bytes, seq: int, fetched_at: float = 0.0
    ) -> int:
        """Write ``data`` under ``key`` atomically (temp file + rename); return its checksum.

        ``fetched_at`` is when the source read began (wall clock; 0.0: unknown).

        Raises
        ------
        OSError
            If the disk is full or unusable (see :func:`is_disk_failure`), or the
            directory was not claimed.

        """
        tmp_dir, objects = self._claimed()
        shard, name = _name_of(key)
        crc = checksum(data)
        key_bytes = _encode_key(key)
        tmp = uuid.uuid4().hex
        try:
            with os.fdopen(self._dir.create_file(tmp_dir, tmp), "wb") as f:
                f.write(data)
                f.write(key_bytes)
                f.write(_footer(key_bytes, len(data), seq, crc, epoch, fetched_at))
            sub = self._dir.open_dir(objects, shard, create=True)
            try:
                os.replace(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=sub)
            finally:
                os.close(sub)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=tmp_dir)
            raise
        return crc

    def read(self, key: str, expected_checksum: int | None = None) -> memoryview | None:
        """Return the verified bytes of ``key``, or ``None`` if missing or not valid.

        The bytes come back as a read-only memoryview of the file's contents (no copy).
        A file that fails verification (damaged, another key's, or not ``expected_checksum``)
        is deleted, so the caller fetches the object again; one that is not this user's is
        never served, nor deleted.
        """
        try:
            raw = self._read_bytes(key)
        except FileNotFoundError:
            return None
        except CacheDirectoryError as err:
            logger.warning("zarr cache does not serve %s: %s", key, err)
            return None
        except OSError:  # unreadable (EIO, permissions, a directory): not usable
            raw = b""
        parsed = _parse(raw)
        if (
            parsed is None
            or parsed[1].key != key
            or (expected_checksum is not None and parsed[1].checksum != expected_checksum)
        ):
            self.delete(key)
            return None
        return parsed[0]

    def delete(self, key: str) -> None:
        """Delete the file of ``key`` (no error if it is not there, or not claimed)."""
        shard, name = _name_of(key)
        with contextlib.suppress(OSError, CacheDirectoryError):
            _, objects = self._claimed()
            sub = self._dir.open_dir(objects, shard)
            try:
                os.unlink(name, dir_fd=sub)
            finally:
                os.close(sub)

    def scan(self) -> Iterator[CacheFile]:
        """Yield every valid cache file; delete damaged files and left-over temp files.

        Each file is read in full and verified before it is trusted.
        """
        tmp_dir, objects = self._claimed()
        for name in os.listdir(tmp_dir):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp_dir)
        for shard in os.listdir(objects):
            sub = self._dir.open_dir(objects, shard)
            try:
                for name in os.listdir(sub):
                    found = self._scan_one(sub, shard, name)
                    if found is not None:
                        yield found
            finally:
                os.close(sub)

    # -- internals -------------------------------------------------------------------------
    def _claimed(self) -> tuple[int, int]:
        if self._tmp is None or self._objects is None:
            raise OSError(errno.ENOENT, "the cache directory is not claimed", str(self.root))
        return self._tmp, self._objects

    def _read_bytes(self, key: str) -> bytes:
        _, objects = self._claimed()
        shard, name = _name_of(key)
        sub = self._dir.open_dir(objects, shard)
        try:
            fd = self._dir.open_file(sub, name)
        finally:
            os.close(sub)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _scan_one(self, sub: int, shard: str, name: str) -> CacheFile | None:
        try:
            fd = self._dir.open_file(sub, name)
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except (OSError, CacheDirectoryError):  # gone, or not this user's: never adopted
            return None
        parsed = _parse(raw)
        if parsed is None or _name_of(parsed[1].key) != (shard, name):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=sub)
            return None
        info = parsed[1]
        return CacheFile(
            info.key, info.size, info.checksum, info.epoch, info.seq, mtime, info.fetched_at
        )


def _name_of(key: str) -> tuple[str, str]:
    """The subdirectory and file name of a cache key: its SHA-256, split 2 + 62."""
    digest = hashlib.sha256(_encode_key(key)).hexdigest()
    return digest[:2], digest[2:]


def _footer(
    key_bytes: bytes, size: int, seq: int, crc: int, epoch: bytes, fetched_at: float
) -> bytes:
    head = _FOOTER.pack(_MAGIC, len(key_bytes), size, seq, crc, epoch, fetched_at, 0)[:-4]
    return head + struct.pack("<I", checksum(key_bytes + head))


def _parse(raw: bytes) -> tuple[memoryview, CacheFile] | None:
    """The payload and description of a file's bytes, or ``None`` if anything is off."""
    if len(raw) < _FOOTER.size:
        return None
    footer_at = len(raw) - _FOOTER.size
    magic, key_len, size, seq, crc, epoch, fetched_at, meta_crc = _FOOTER.unpack_from(
        raw, footer_at
    )
    if magic != _MAGIC or size + key_len != footer_at:
        return None
    view = memoryview(raw)
    key_bytes = bytes(view[size:footer_at])
    if checksum(key_bytes + bytes(view[footer_at : len(raw) - 4])) != meta_crc:
        return None
    payload = view[:size]  # no copy
    if checksum(payload) != crc:
        return None
    key = key_bytes.decode("utf-8", "surrogatepass")
    return payload, CacheFile(key, size, crc, epoch, seq, 0.0, fetched_at)
