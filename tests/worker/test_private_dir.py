"""A shared node: cached data is private, and another local user cannot fool the cache.

The second user is real: a subprocess that drops to ``nobody`` (``os.setuid``), so these
tests need root (CI runs as root) and are skipped, with that reason, otherwise.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from dask_zarr_cache import CacheDirectoryError
from dask_zarr_cache.worker.disk import DiskCache, _footer, checksum
from dask_zarr_cache.worker.private_dir import directory_mode
from tests.fakes import FakeClock, FakeNetwork, Source

NOBODY = 65534
#: The second user's interpreter: the system's (a venv under root's home is closed to it).
OTHER_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(OTHER_PYTHON, os.X_OK),
    reason="needs root (to act as a second user) and a system python3",
)
EPOCH = b"e" * 16


@pytest.fixture
def shared_base():
    """Node-local scratch that every local user may write to, as /tmp (sticky)."""
    base = Path(tempfile.mkdtemp(prefix="dzc-shared-", dir="/tmp"))
    base.chmod(0o1777)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def as_nobody(script: str, **paths: Path) -> subprocess.CompletedProcess:
    """Run ``script`` as user ``nobody``; ``paths`` are given to it as variables."""
    header = "".join(f"{name} = {str(path)!r}\n" for name, path in paths.items())

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run(
        [OTHER_PYTHON, "-c", header + textwrap.dedent(script)],
        preexec_fn=drop,
        capture_output=True,
        text=True,
        timeout=60,
    )


def tree(path: Path) -> dict[str, tuple]:
    """Everything below ``path`` (not following symlinks): what would show a change."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            content = Path(full).read_bytes() if stat.S_ISREG(info.st_mode) else None
            link = os.readlink(full) if stat.S_ISLNK(info.st_mode) else None
            found[os.path.relpath(full, path)] = (info.st_mode, info.st_uid, content, link)
    return found


def test_cache_files_and_directories_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        disk = DiskCache(tmp_path / "parent" / "cache")
        disk.open()
        disk.write("ns\x00k", b"secret", EPOCH, 0)
        disk.close()
    finally:
        os.umask(old)
    root = tmp_path / "parent" / "cache"
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}
    modes[root.parent.relative_to(tmp_path)] = stat.S_IMODE(root.parent.stat().st_mode)
    modes[root.relative_to(tmp_path)] = stat.S_IMODE(root.stat().st_mode)
    dirs = {p for p in modes if (tmp_path / p).is_dir()}
    assert dirs and all(modes[p] == 0o700 for p in dirs), modes
    assert all(modes[p] == 0o600 for p in set(modes) - dirs), modes


def test_a_file_mode_setting_shares_deliberately(tmp_path):
    disk = DiskCache(tmp_path / "cache", file_mode=0o640)
    disk.open()
    disk.write("ns\x00k", b"shared", EPOCH, 0)
    path = disk.path_of("ns\x00k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750 == directory_mode(0o640)
    disk.close()
    narrower = DiskCache(tmp_path / "cache")  # a later, private setting narrows old modes
    narrower.open()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert narrower.read("ns\x00k") == b"shared"


@needs_root
def test_another_user_cannot_read_cached_chunks(shared_base):
    disk = DiskCache(shared_base / "cache")
    disk.open()
    disk.write("ns\x00k", b"embargoed", EPOCH, 0)
    done = as_nobody(
        """
        import os
        for path in (root, objects, chunk):
            try:
                open(path, "rb").read() if os.path.isfile(path) else os.listdir(path)
            except PermissionError:
                print("denied", path)
            else:
                print("READ", path)
        """,
        root=disk.root,
        objects=disk.root / "objects",
        chunk=disk.path_of("ns\x00k"),
    )
    assert done.returncode == 0, done.stderr
    assert "READ" not in done.stdout and done.stdout.count("denied") == 3, done.stdout


@needs_root
@pytest.mark.parametrize("trap", ["their-directory", "symlinked-objects", "symlinked-shard"])
def test_a_directory_another_user_prepared_is_refused_and_left_untouched(shared_base, trap):
    victim = shared_base / "victim-home"  # what the symlinks point at: never to be touched
    victim.mkdir()
    (victim / "thesis.txt").write_bytes(b"years of work")
    victim.chmod(0o777)
    cache = shared_base / "cache"
    if trap != "their-directory":  # the worker's own directory, opened up by an old umask
        cache.mkdir()
        cache.chmod(0o777)
    shard = DiskCache(cache).path_of("ns\x00k").parent.name
    done = as_nobody(
        f"""
        import json, os
        trap = {trap!r}
        os.makedirs(cache, exist_ok=True)
        open(os.path.join(cache, "DASK-ZARR-CACHE"), "w").write(json.dumps({{"format": 2}}))
        if trap == "symlinked-objects":
            os.symlink(victim, os.path.join(cache, "objects"))
        else:
            os.makedirs(os.path.join(cache, "objects"))
            os.symlink(victim, os.path.join(cache, "objects", {shard!r}))
        os.makedirs(os.path.join(cache, "tmp"), exist_ok=True)
        """,
        cache=cache,
        victim=victim,
    )
    assert done.returncode == 0, done.stderr
    before, victim_before = tree(cache), tree(victim)
    disk = DiskCache(cache)
    with pytest.raises(CacheDirectoryError, match=r"refusing|another user"):
        disk.open()
    with pytest.raises(OSError):
        disk.write("ns\x00k", b"x", EPOCH, 0)  # never claimed: nothing is written
    disk.delete("ns\x00k")
    assert tree(victim) == victim_before and (victim / "thesis.txt").read_bytes()
    if trap == "their-directory":
        assert tree(cache) == before  # not one mode changed
    else:  # nothing of theirs changed (the worker's own directory may be narrowed)
        assert tree(cache) == before


@needs_root
def test_a_well_formed_forgery_planted_by_another_user_is_never_served(shared_base):
    disk = DiskCache(shared_base / "cache")
    disk.open()
    disk.write("ns\x00other", b"mine", EPOCH, 0)
    disk.close()
    (shared_base / "cache").chmod(0o777)  # an old umask left it open
    for sub in (shared_base / "cache").rglob("*"):
        if sub.is_dir():
            sub.chmod(0o777)
    forged = disk.path_of("ns\x00k")
    key = b"ns\x00k"
    payload = b"forged chunk"
    body = payload + key + _footer(key, len(payload), 0, checksum(payload), EPOCH, 0.0)
    script = f"import os\nos.makedirs(os.path.dirname({str(forged)!r}), exist_ok=True)\n"
    script += f"open({str(forged)!r}, 'wb').write({body!r})\n"
    planted = as_nobody(script)
    assert planted.returncode == 0, planted.stderr
    assert os.stat(forged).st_uid == NOBODY
    before = tree(shared_base / "cache")
    with pytest.raises(CacheDirectoryError, match="belongs to user 65534"):
        DiskCache(shared_base / "cache").open()
    assert forged.read_bytes() == body  # refused, not served, not deleted
    assert {k: v[1:] for k, v in tree(shared_base / "cache").items()} == {
        k: v[1:] for k, v in before.items()
    }


def test_a_parent_others_can_write_to_is_refused_unless_sticky_or_trusted(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(CacheDirectoryError, match="trusted-parent"):
        DiskCache(parent / "cache").open()
    assert not (parent / "cache").exists()
    trusted = DiskCache(parent / "cache", trusted_parent=True)  # a pod's own emptyDir
    trusted.open()
    trusted.close()
    parent.chmod(0o1777)  # sticky, like /tmp: others cannot rename the cache's directory
    DiskCache(parent / "cache").open()


async def test_a_refused_directory_reads_through(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    net = FakeNetwork()
    a = await net.worker("tcp://a:1", parent / "cache", FakeClock())
    source = Source()
    assert await a.get("ns\x00k", source) == b"bytes"
    assert await a.get("ns\x00k", source) == b"bytes"
    await asyncio.sleep(0)
    assert source.reads == 2 and a.counters.caching_disabled == 1
    assert not (parent / "cache").exists()
