from __future__ import annotations

import os

import dask.config
import pytest

from dask_zarr_cache import CacheConfigError, ZarrCachePlugin
from dask_zarr_cache.core.config import CacheSettings


def test_sizes_parse_from_int_and_dask_strings():
    assert CacheSettings.from_arguments(1024).max_size == 1024
    assert CacheSettings.from_arguments("2GiB").max_size == 2 * 2**30
    assert CacheSettings.from_arguments("1.5 MB").max_size == 1_500_000


@pytest.mark.parametrize("bad", [0, -1, "lots", "", True, 1.5, [1], "-3GiB"])
def test_bad_max_size_is_a_clear_error(bad):
    with pytest.raises(CacheConfigError, match="max_size"):
        ZarrCachePlugin(max_size=bad)


@pytest.mark.parametrize("name", ["max_age_seconds", "revalidate_after"])
@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "soon", True])
def test_bad_seconds_are_a_clear_error(bad, name):
    with pytest.raises(CacheConfigError, match=name):
        ZarrCachePlugin(max_size="1GiB", **{name: bad})


def test_revalidate_after_comes_from_dask_config_too():
    assert ZarrCachePlugin(max_size="1GiB", revalidate_after="30").settings.revalidate_after == 30
    with dask.config.set({"zarr-cache.revalidate-after": 60}):
        assert ZarrCachePlugin(max_size="1GiB").settings.revalidate_after == 60.0
    assert ZarrCachePlugin(max_size="1GiB").settings.revalidate_after is None


@pytest.mark.parametrize("bad", ["", 42, "a\x00b"])
def test_bad_directory_is_a_clear_error(bad):
    with pytest.raises(CacheConfigError, match="directory"):
        ZarrCachePlugin(max_size="1GiB", directory=bad)


def test_unset_arguments_come_from_dask_config(tmp_path):
    with dask.config.set(
        {
            "zarr-cache.max-size": "3MiB",
            "zarr-cache.max-age-seconds": 60,
            "zarr-cache.directory": str(tmp_path),
        }
    ):
        settings = CacheSettings.from_arguments()
    # memory: max-size / 16 unless set
    assert settings == CacheSettings(3 * 2**20, 60.0, str(tmp_path), memory_size=3 * 2**16)


def test_memory_settings_come_from_arguments_dask_config_or_the_disk_budget():
    assert CacheSettings.from_arguments("64GiB").memory_size == 256 * 2**20  # the cap
    plugin = ZarrCachePlugin(max_size="1GiB", memory_size="8MiB", memory_object_limit="4KiB")
    assert (plugin.settings.memory_size, plugin.settings.memory_object_limit) == (8 << 20, 4096)
    with dask.config.set({"zarr-cache.memory-size": 0}):
        assert CacheSettings.from_arguments("1GiB").memory_size == 0  # none
    for bad in ({"memory_size": -1}, {"memory_object_limit": 0}, {"memory_size": "lots"}):
        with pytest.raises(CacheConfigError, match="memory"):
            ZarrCachePlugin(max_size="1GiB", **bad)


def test_plugin_pickles_to_its_settings_only():
    import pickle

    plugin = ZarrCachePlugin(max_size="1MiB", max_age_seconds=5)
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.settings == plugin.settings
    assert "max_size=1048576" in repr(clone)


@pytest.mark.parametrize(
    "names", [["..", "."], ["a b", "a_b"], ["x" * 300, "x" * 301], ["w/../../etc", "w"]]
)
def test_worker_directories_stay_inside_and_apart(tmp_path, names):
    from dask_zarr_cache.core.config import worker_directory

    settings = CacheSettings.from_arguments(directory=tmp_path)
    dirs = [worker_directory(settings, name, "/unused") for name in names]
    assert len(set(dirs)) == len(dirs)
    for d in dirs:
        assert os.path.dirname(d) == str(tmp_path)  # one level below, never above
        assert len(os.path.basename(d)) < 100
    assert dirs == [worker_directory(settings, name, "/unused") for name in names]  # stable


def test_policy_and_locality_come_from_dask_config():
    assert CacheSettings.from_arguments(1).policy == "tinylfu"
    assert CacheSettings.from_arguments(1).locality is True
    with dask.config.set({"zarr-cache.policy": "lru", "zarr-cache.locality": False}):
        settings = CacheSettings.from_arguments(1)
    assert (settings.policy, settings.locality) == ("lru", False)
    with (
        dask.config.set({"zarr-cache.policy": "lfu"}),
        pytest.raises(CacheConfigError, match="policy must be one of"),
    ):
        CacheSettings.from_arguments(1)


@pytest.mark.parametrize(
    ("given", "mode"), [("0600", 0o600), ("640", 0o640), ("0o660", 0o660), (0o644, 0o644)]
)
def test_file_modes_are_octal(given, mode):
    with dask.config.set({"zarr-cache.file-mode": given}):
        assert CacheSettings.from_arguments(1).file_mode == mode


@pytest.mark.parametrize("given", ["0400", "0700", "0777", "rw", 600, True])
def test_file_modes_that_lock_out_the_owner_or_grant_execution_are_refused(given):
    with dask.config.set({"zarr-cache.file-mode": given}), pytest.raises(CacheConfigError):
        CacheSettings.from_arguments(1)


@pytest.mark.parametrize(
    ("given", "trusted"), [(False, False), ("false", False), ("True", True), ("1", True)]
)
def test_trusted_parent_is_a_flag(given, trusted):
    assert CacheSettings.from_arguments(1).trusted_parent is False
    with dask.config.set({"zarr-cache.trusted-parent": given}):
        assert CacheSettings.from_arguments(1).trusted_parent is trusted
    with dask.config.set({"zarr-cache.trusted-parent": "maybe"}), pytest.raises(CacheConfigError):
        CacheSettings.from_arguments(1)
