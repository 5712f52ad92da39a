"""A directory only this user controls: checked before use, like ssh checks ``~/.ssh``.

Cache files were fetched with the worker's credentials and may be private; the directory
often sits on node-local scratch that many users share.  So the cache's directory, and
everything the cache creates in it, is private (``0700`` directories and ``0600`` files
by default, whatever the umask; ``zarr-cache.file-mode`` shares deliberately), and before
a directory is used or adopted it must be one that nobody else can read, plant files in,
or swap for a symlink:

- its parent is owned by this user or root, and other users cannot write to it unless
  it has the sticky bit (``/tmp``) or the deployment says it trusts them
  (``zarr-cache.trusted-parent``: a Kubernetes ``emptyDir`` shared by one pod's
  containers);
- the directory itself and every entry below it are owned by this user, are real
  directories and files (never symlinks), and grant nobody more than the file mode does
  (modes an earlier setting left are narrowed);
- it is opened once (``O_DIRECTORY | O_NOFOLLOW``) and everything below it is reached
  relative to open directories (``dir_fd``), with ``O_NOFOLLOW``, so no path is looked
  up again where someone could have swapped a component meanwhile.

A directory that fails a check is refused with :class:`CacheDirectoryError` (the worker
then reads through): nothing in it is written or deleted, and nothing of another user's
is changed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING

from dask_zarr_cache.core.exceptions import CacheDirectoryError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["PrivateDirectory", "directory_mode"]

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def directory_mode(file_mode: int) -> int:
    """Directories' mode for ``file_mode``: who may read a file may list its directory."""
    return file_mode | ((file_mode & 0o444) >> 2)


class PrivateDirectory:
    """One directory tree of this user's, opened safely (methods block; call in a thread).

    Parameters
    ----------
    root : Path
        The directory (created if missing, with its missing parents).
    file_mode : int
        Mode of the files created below it (directories: :func:`directory_mode`).
    trusted_parent : bool
        Accept a parent directory that other users may write to without the sticky bit.

    """

    def __init__(self, root: Path, file_mode: int = 0o600, trusted_parent: bool = False) -> None:
        self.root = root
        self.file_mode = file_mode
        self.dir_mode = directory_mode(file_mode)
        self.trusted_parent = trusted_parent
        self.uid = os.geteuid()
        self.fd: int | None = None

    # -- the directory ---------------------------------------------------------------------
    def open(self) -> int:
        """Check and open the directory (creating it private if missing); returns its fd.

        Raises
        ------
        CacheDirectoryError
            If it, its parent or anything in it fails a check (nothing was touched).
        OSError
            If it cannot be created or opened (the disk is unusable).

        """
        parent = self.root.parent
        if not parent.exists():  # a parent the cache makes is as private as the rest
            parent.mkdir(parents=True, exist_ok=True)
            parent.chmod(self.dir_mode)
        self._check_parent(os.stat(parent), parent)
        parent_fd = os.open(parent, _DIRECTORY)
        try:
            self.fd = self.open_dir(parent_fd, self.root.name, create=True)
        finally:
            os.close(parent_fd)
        return self.fd

    def close(self) -> None:
        """Close the directory (its files stay)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def verify_tree(self, dir_fd: int, where: str = "") -> None:
        """Check every entry below ``dir_fd`` (owned, not a symlink; modes narrowed).

        Raises
        ------
        CacheDirectoryError
            On the first entry that is not this user's, or is a symlink.

        """
        for entry in _entries(dir_fd):
            info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            path = f"{where}{entry}"
            if stat.S_ISDIR(info.st_mode):
                child = self._open_checked(dir_fd, entry, info, path)
                try:
                    self.verify_tree(child, f"{path}/")
                finally:
                    os.close(child)
            elif stat.S_ISREG(info.st_mode):
                self._check_owner(info, path)
                if stat.S_IMODE(info.st_mode) & ~self.file_mode:
                    os.chmod(entry, self.file_mode, dir_fd=dir_fd, follow_symlinks=False)
            else:
                self._refuse(f"{path} is a symlink or special file, not the cache's")

    # -- entries ---------------------------------------------------------------------------
    def open_dir(self, dir_fd: int, name: str, create: bool = False) -> int:
        """Open subdirectory ``name`` of ``dir_fd`` (made private if ``create``)."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, self.dir_mode, dir_fd=dir_fd)
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode):
            self._refuse(f"{name} is not a directory (a symlink?)")
        return self._open_checked(dir_fd, name, info, name)

    def create_file(self, dir_fd: int, name: str) -> int:
        """Create file ``name`` in ``dir_fd`` (new, never through a symlink); its fd."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, self.file_mode, dir_fd=dir_fd)
        os.fchmod(fd, self.file_mode)  # whatever the umask
        return fd

    def open_file(self, dir_fd: int, name: str, flags: int = os.O_RDONLY) -> int:
        """Open this user's file ``name`` in ``dir_fd``, never through a symlink.

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        CacheDirectoryError
            If it is not a regular file of this user's.

        """
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, self.file_mode, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self._refuse(f"{name} is not a regular file")
            self._check_owner(info, name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- checks ------------------------------------------------------------------------------
    def _open_checked(self, dir_fd: int, name: str, info: os.stat_result, path: str) -> int:
        self._check_owner(info, path)
        fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                self._refuse(f"{path} was replaced while it was opened")
            if stat.S_IMODE(opened.st_mode) & ~self.dir_mode:
                os.fchmod(fd, self.dir_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_owner(self, info: os.stat_result, path: str) -> None:
        if info.st_uid != self.uid:
            self._refuse(f"{path} belongs to user {info.st_uid}, not to this worker's user")

    def _check_parent(self, info: os.stat_result, parent: Path) -> None:
        if info.st_uid not in (0, self.uid):
            self._refuse(f"its parent {parent} belongs to another user ({info.st_uid})")
        others_write = stat.S_IMODE(info.st_mode) & 0o022
        if others_write and not info.st_mode & stat.S_ISVTX and not self.trusted_parent:
            self._refuse(
                f"its parent {parent} can be written by other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}, no sticky bit), who could swap the cache's "
                "directory; use a private parent, or set zarr-cache.trusted-parent if those "
                "users are trusted (a Kubernetes emptyDir shared by one pod's containers)"
            )

    def _refuse(self, why: str) -> None:
        raise CacheDirectoryError(
            f"refusing to use {self.root} as a cache directory: {why} (nothing there was "
            "written or deleted; reading through to the source)"
        )


def _entries(dir_fd: int) -> Iterator[str]:
    with os.scandir(dir_fd) as entries:
        names = [e.name for e in entries]
    yield from names
