"""Locality: the hash ring, finding the chunks a task reads, steering tasks, end to end."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import dask
import dask.array as da
import dask.config
import numpy as np
import pytest
import xarray as xr
import zarr
from dask._task_spec import convert_legacy_graph
from zarr.storage import LocalStore

from dask_zarr_cache import ClusterCacheStore, cluster_stats
from dask_zarr_cache.identity.keys import SEPARATOR
from dask_zarr_cache.scheduler.locality import HashRing, chunk_cache_keys, steer_reads
from tests.conftest import cache_cluster, cached, chunk_gets, write_array

WORKERS = [f"tcp://127.0.0.1:{4000 + i}" for i in range(4)]


def test_ring_is_stable_balanced_and_moves_few_keys_when_a_worker_joins():
    keys = [f"ns{SEPARATOR}data.zarr/c/{i}/{j}" for i in range(100) for j in range(100)]
    ring = HashRing(WORKERS)
    homes = {k: ring.home(k) for k in keys}
    assert homes == {k: HashRing(reversed(WORKERS)).home(k) for k in keys}
    counts = np.array([list(homes.values()).count(w) for w in WORKERS])
    assert counts.min() > 0.75 * len(keys) / 4 and counts.max() < 1.25 * len(keys) / 4, counts
    bigger = HashRing([*WORKERS, "tcp://127.0.0.1:5000"])
    moved = [k for k in keys if bigger.home(k) != homes[k]]
    assert 0.1 < len(moved) / len(keys) < 0.3
    assert {bigger.home(k) for k in moved} == {"tcp://127.0.0.1:5000"}
    assert HashRing([]).home("k") is None


def _graph(collection) -> dict:
    (optimized,) = dask.optimize(collection)
    return convert_legacy_graph(dict(optimized.__dask_graph__()))


def _read_keys(collection) -> dict:
    graph = _graph(collection)
    found = {k: chunk_cache_keys(spec, graph.get) for k, spec in graph.items()}
    return {k: [c.rsplit("/", 3)[-3:] for c in v] for k, v in found.items() if v}


@pytest.fixture
def local_array(tmp_path):
    data = np.arange(40 * 40, dtype="f4").reshape(40, 40)
    zarr.create_array(LocalStore(tmp_path / "a.zarr"), data=data, chunks=(10, 10))
    return tmp_path / "a.zarr"


def test_finds_the_chunk_of_each_fused_read_task(local_array):
    arr = zarr.open_array(ClusterCacheStore(LocalStore(local_array)), mode="r")
    found = _read_keys(da.from_zarr(arr).astype("f8").sum())
    assert sorted(tuple(v[0]) for v in found.values()) == [
        ("c", str(i), str(j)) for i in range(4) for j in range(4)
    ]
    assert all(len(v) == 1 for v in found.values())


def test_a_task_over_several_chunks_names_them_all(local_array):
    arr = zarr.open_array(ClusterCacheStore(LocalStore(local_array)), mode="r")
    found = _read_keys(da.from_zarr(arr, chunks=(20, 20)) + 1)
    assert len(found) == 4 and all(len(v) == 4 for v in found.values())


def test_shards_are_the_objects_read(tmp_path):
    store = LocalStore(tmp_path / "s.zarr")
    zarr.create_array(store, shape=(40, 40), chunks=(10, 10), shards=(20, 20), dtype="f4")
    arr = zarr.open_array(ClusterCacheStore(LocalStore(tmp_path / "s.zarr")), mode="r")
    found = _read_keys(da.from_zarr(arr).sum())
    assert sorted({tuple(k) for v in found.values() for k in v}) == [
        ("c", str(i), str(j)) for i in range(2) for j in range(2)
    ]


def test_finds_reads_under_xarray_wrappers_but_not_a_lazy_subselection(tmp_path):
    ds = xr.Dataset({"v": (("time", "x"), np.ones((40, 40), "f4"))})
    ds.to_zarr(tmp_path / "ds.zarr", encoding={"v": {"chunks": (10, 10)}}, zarr_format=3)
    opened = xr.open_zarr(ClusterCacheStore(LocalStore(tmp_path / "ds.zarr")))
    found = _read_keys(opened.v.mean())
    assert len(found) == 16 and all(v[0][0] == "c" for v in found.values())
    # Selected lazily before chunking: the wrapper's own index; not steered, still correct.
    lazy = xr.open_zarr(ClusterCacheStore(LocalStore(tmp_path / "ds.zarr")), chunks=None)
    assert _read_keys(lazy.v.isel(time=slice(5, 30)).chunk(time=10).mean()) == {}


def test_reads_not_through_the_cache_are_not_steered(local_array):
    assert _read_keys(da.from_zarr(zarr.open_array(LocalStore(local_array))).sum()) == {}
    assert _read_keys(da.ones((10, 10), chunks=5).sum()) == {}


class _FakeScheduler:
    """The scheduler state ``steer_reads`` reads: tasks and running workers."""

    def __init__(self, graph: dict, workers: list[str]) -> None:
        self.running = [SimpleNamespace(address=w) for w in workers]
        self.tasks = {
            k: SimpleNamespace(
                key=k,
                run_spec=spec,
                state="released",
                worker_restrictions=None,
                host_restrictions=None,
                resource_restrictions=None,
                loose_restrictions=False,
            )
            for k, spec in graph.items()
        }


def test_steering_sets_loose_restrictions_on_reads_only(local_array):
    arr = zarr.open_array(ClusterCacheStore(LocalStore(local_array)), mode="r")
    scheduler = _FakeScheduler(_graph(da.from_zarr(arr).astype("f8").sum()), WORKERS)
    pinned = next(t for t in scheduler.tasks.values() if _read_keys_of(scheduler, t))
    pinned.worker_restrictions = {"tcp://elsewhere:1"}  # the user's own restriction
    assert steer_reads(scheduler, list(scheduler.tasks)) == 15
    assert pinned.worker_restrictions == {"tcp://elsewhere:1"} and not pinned.loose_restrictions
    ring = HashRing(WORKERS)
    for ts in scheduler.tasks.values():
        keys = _read_keys_of(scheduler, ts)
        if keys and ts is not pinned:
            assert ts.worker_restrictions == {ring.home(keys[0])} and ts.loose_restrictions
        elif not keys:
            assert ts.worker_restrictions is None
    alone = _FakeScheduler(_graph(da.from_zarr(arr).sum()), WORKERS[:1])
    assert steer_reads(alone, list(alone.tasks)) == 0  # one worker: nothing to choose


def _read_keys_of(scheduler: _FakeScheduler, ts) -> list[str]:
    return chunk_cache_keys(ts.run_spec, lambda k: scheduler.tasks[k].run_spec)


def _local_share_of_warm_pass(client, store) -> tuple[float, int]:
    arr = zarr.open_array(store, mode="r")
    before = cluster_stats(client)["total"]
    client.compute(da.from_zarr(arr, name=f"read-{uuid.uuid4().hex}").sum()).result()
    after = cluster_stats(client)["total"]
    hits, peers = (after[k] - before[k] for k in ("hits", "peer_reads"))
    return hits / (hits + peers), after["remote_reads"] - before["remote_reads"]


@pytest.mark.parametrize("locality", [True, False])
def test_warm_pass_is_served_from_the_readers_own_disk(s3, s3_path, locality):
    """Processes, real S3: with locality >= 90% of warm reads are local; without, ~1/3."""
    data = np.random.default_rng(1).random((160, 160), dtype="f4")
    write_array(s3, s3_path, data, chunks=(20, 20))
    with dask.config.set({"zarr-cache.locality": locality}), cache_cluster(3) as (_, client):
        store = cached(s3, s3_path)
        s3.reset_counts()
        np.testing.assert_array_equal(
            client.compute(da.from_zarr(zarr.open_array(store, mode="r"))).result(), data
        )
        shares = [_local_share_of_warm_pass(client, store) for _ in range(2)]
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 64 and set(gets.values()) == {1}  # each chunk read from S3 once
    assert not [k for (m, k) in s3.requests if m == "HEAD" and k in gets]  # and no HEAD
    assert all(remote == 0 for _, remote in shares)
    if locality:
        assert min(share for share, _ in shares) >= 0.9, shares
    else:
        assert max(share for share, _ in shares) < 0.7, shares
