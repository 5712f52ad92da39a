"""The benchmark scripts run end to end (tiny sizes): reads, index micro-benchmark, index load."""

from __future__ import annotations

import asyncio
import http.client
import os
import threading
import time

import numpy as np
import pytest
import s3fs
import zarr
from zarr.storage import FsspecStore, LocalStore

from benchmarks import _micro, _s3, _tiny, index_load, next_cluster, run, write_load, writes


def test_benchmark_runs_every_path_and_reports(tmp_path, capsys):
    argv = ["--workers", "2", "--passes", "2", "--side", "256", "--chunk", "64"]
    argv += ["--latency-ms", "5", "--skip-micro", "--skip-workloads", "--skip-tiny"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0
    report = (tmp_path / "latest.md").read_text()
    for name in ("no cache", "zarr CacheStore", "simplecache", "dask-zarr-cache", "floor"):
        assert name in report
    assert "S3 endpoint excess over the 5 ms latency: mean" in report
    assert "warm pass / floor pass: **" in report and "(min-max over passes" in report
    assert "warm-pass cache reads from the reader's own disk: **" in report
    assert "remote GETs per unique chunk (dask-zarr-cache): **1.00**" in report
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    assert "cold pass over ObjectStore / one-GET no-cache pass: **" in report
    assert "| dask-zarr-cache over ObjectStore, pass 1 |" in report  # where the time goes


def test_tiny_chunk_workload_counts_the_index_decisions_of_its_cold_pass(tmp_path):
    result = _tiny.run(tmp_path, workers=2, passes=2, shape=(320, 160))
    assert result.correct and result.n_chunks == 200
    # Every chunk of the cold pass was decided once (a fetch), in fewer messages than keys.
    assert result.cold_decisions == 200 and 0 < result.cold_asks < 200
    report = _tiny.markdown(result)
    assert "- cold pass / no-cache pass: **" in report
    assert "index decisions/s during the cold pass: **" in report


@pytest.mark.slow
def test_benchmark_workloads_run_and_report(tmp_path):
    """Locality on/off and both policies on data bigger than the cache (tiny sizes)."""
    argv = ["--workers", "2", "--passes", "2", "--side", "256", "--chunk", "64"]
    argv += ["--latency-ms", "5", "--skip-micro", "--out", str(tmp_path), "--name", "w"]
    assert run.main(argv) == 0
    report = (tmp_path / "w.md").read_text()
    assert "Warm wall time, locality on / off: **" in report
    rows = [line for line in report.splitlines() if line.startswith(("| tinylfu", "| lru"))]
    assert len(rows) == 2
    for row in rows:  # no worker ever held more than its budget
        assert float(row.rstrip(" |").rsplit("|", 1)[1]) <= 1.0, row


@pytest.mark.slow  # the benchmark tool's own run (.ci/run's slow part)
def test_next_cluster_benchmark_reports_both_passes(capsys):
    argv = ["--workers", "2", "--side", "512", "--chunk", "128", "--latency-ms", "5"]
    assert next_cluster.main(argv) == 0
    out = capsys.readouterr().out
    assert "first pass of the next cluster:  " in out and "ratio next / cold: " in out
    assert "0.00 GETs/chunk" in out  # every file of the first cluster was kept


def test_index_micro_benchmark_measures_throughput_and_memory():
    ops = _micro.index_throughput(5000)
    assert min(ops.values()) > 0
    assert 0 < _micro.index_memory_per_key(50_000) < 120  # issue #12's budget per key


def test_hit_latency_micro_benchmark_times_file_reads_and_memory_copies():
    table = _micro.hits_markdown(n=50, sizes=(1024,))
    rows = [line.split("|") for line in table.splitlines()[2:]]
    assert [r[2].strip() for r in rows] == ["off", "on"]
    assert all(0 < float(r[3]) <= float(r[4]) for r in rows)  # p50 <= p99, in microseconds


def test_benchmark_s3_endpoint_serves_a_one_range_get_as_it_serves_a_plain_one(tmp_path):
    # The cache's one-GET read asks for ``bytes=0-``: it must cost what a plain GET does.
    body = bytes(range(256)) * 1024  # 256 KiB, a benchmark chunk
    (tmp_path / "bkt").mkdir()
    (tmp_path / "bkt" / "obj").write_bytes(body)
    with _s3.ParallelS3Server(tmp_path, processes=1) as s3:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
        for _ in range(30):
            assert fs.cat_file("bkt/obj") == body
        plain = s3.service_times()
        s3.reset_counts()
        for _ in range(30):
            assert fs.cat_file("bkt/obj", start=0) == body
            assert fs.cat_file("bkt/obj", start=5, end=70) == body[5:70]
        ranged = s3.service_times()
        assert fs.cat_file("bkt/obj", start=len(body) - 3) == body[-3:]
    assert plain.n == 30 and ranged.n == 60
    # Through moto a ranged GET took 2.0 ms more than a plain one (0.26 ms) from the snapshot.
    assert ranged.mean_ms < 2 * plain.mean_ms + 0.5, (plain, ranged)


def _mean_get_ms(endpoint: str, paths: list[str], readers: int, seconds: float) -> float:
    """Mean wall time of plain GETs from ``readers`` threads, each on its own keep-alive."""
    port = int(endpoint.rsplit(":", 1)[1])
    stop = time.perf_counter() + seconds
    times: list[float] = []

    def read(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        i = first
        while time.perf_counter() < stop:
            start = time.perf_counter()
            conn.request("GET", "/" + paths[i % len(paths)], headers=_s3._AUTH)
            reply = conn.getresponse()
            assert reply.status == 200 and len(reply.read()) == 256 * 1024
            times.append(time.perf_counter() - start)
            i += readers
        conn.close()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1000 * sum(times) / len(times)


@pytest.mark.slow  # the benchmark tool's own run (.ci/run's slow part)
def test_benchmark_s3_endpoint_adds_the_configured_latency_at_8_readers(tmp_path):
    """What the endpoint adds over its own no-latency time is the configured 20 ms, once."""
    (tmp_path / "bkt" / "o").mkdir(parents=True)
    for i in range(64):
        (tmp_path / "bkt" / "o" / str(i)).write_bytes(os.urandom(256 * 1024))
    paths = [f"bkt/o/{i}" for i in range(64)]
    with _s3.ParallelS3Server(tmp_path, processes=2) as s3:
        _mean_get_ms(s3.endpoint_url, paths, readers=8, seconds=1)  # connections, caches
        unloaded = _mean_get_ms(s3.endpoint_url, paths, readers=8, seconds=3)
        s3.latency = 0.020
        s3.reset_counts()
        loaded = _mean_get_ms(s3.endpoint_url, paths, readers=8, seconds=4)
        service = s3.service_times()
    added = loaded - unloaded
    print(f"no latency {unloaded:.2f} ms, 20 ms latency {loaded:.2f} ms, {service}")
    # Every GET waits the configured latency, and only once (twice would add 40 ms).
    # ``added`` may fall short of 20 ms: 8 readers queue on 2 processes without latency,
    # and with it their queueing hides inside the sleeps. What a busy 2-core machine adds
    # on top is the benchmark's to report (it prints the endpoint's own excess).
    assert loaded >= 20.0 and added <= 30.0, (unloaded, loaded)
    # The benchmark itself warns when the excess tops 10% (its numbers are then inflated);
    # here, on a 2-core machine busy with the test run, a quarter of the latency at most.
    assert service.n > 500 and service.mean_ms < 0.25 * service.latency_ms, service


def test_benchmark_s3_endpoint_speaks_s3_over_a_read_only_snapshot(tmp_path):
    data = np.arange(10_000, dtype="f4").reshape(100, 100)
    array = zarr.create_array(
        LocalStore(tmp_path / "bkt" / "a b.zarr"), shape=data.shape, chunks=(30, 30), dtype="f4"
    )
    array[...] = data
    with _s3.ParallelS3Server(tmp_path, processes=2) as s3:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
        meta = (tmp_path / "bkt" / "a b.zarr" / "zarr.json").read_bytes()
        assert fs.ls("bkt") == ["bkt/a b.zarr"]
        assert fs.info("bkt/a b.zarr/zarr.json")["size"] == len(meta)
        assert fs.cat_file("bkt/a b.zarr/zarr.json", start=2, end=10) == meta[2:10]
        store = FsspecStore.from_url(
            "s3://bkt/a b.zarr", storage_options=s3.storage_options, read_only=True
        )
        np.testing.assert_array_equal(zarr.open_array(store, mode="r")[...], data)
        assert s3.object_gets["bkt/a b.zarr/c/0/0"] == 1
        assert s3.bytes_sent > 0
        with pytest.raises(FileNotFoundError):
            fs.cat("bkt/missing")
        with pytest.raises(PermissionError):
            fs.pipe("bkt/new", b"1")
        s3.reset_counts()
        assert s3.object_gets == {} and s3.service_times().n == 0


@pytest.mark.slow  # the benchmark tool's own run (.ci/run's slow part)
def test_index_load_generator_measures_decisions_latency_and_cpu():
    with index_load.index_cluster(1) as client:
        for trace, kind in (("cold", "fetch"), ("warm", "peer"), ("skewed", "peer")):
            numbers = index_load.measure(
                client, workers=4, callers=8, trace=trace, held=2000, seconds=1.0,
                processes=2, setup=6,
            )  # fmt: skip
            assert numbers["decisions/s"] > 100 and numbers["callers"] == 8, numbers
            assert kind in numbers["kinds"] and numbers["failures"] == 0
            assert 0 < numbers["p50 ms"] <= numbers["p99 ms"] < 1000
            assert numbers["keys/message"] >= 1 and numbers["shard CPU µs/decision"] > 0
        assert set(numbers["kinds"]) == {"fetch", "peer"}  # skewed: held and new keys


def test_index_memory_is_measured_on_the_shards_process():
    (row,) = index_load.memory([200_000])
    assert row["keys"] == 200_000
    assert 0 < row["table bytes/key"] < row["bytes/key"] < 200, row


@pytest.mark.slow
def test_losing_a_shard_is_measured_back_to_read_once():
    result = index_load.recovery(
        shards=2, held=40_000, workers=10, callers=8, processes=2, seconds=16
    )
    assert result["new shard located after s"] is not None
    assert result["last duplicate after s"] < 16, result  # back to read-once in the run
    assert result["duplicates before the kill"] == 0, result


def test_write_load_shows_a_writes_cost_at_the_scheduler_does_not_grow_with_workers():
    batched = [asyncio.run(write_load.run(n, 0.3, 0.001, alone=False)) for n in (4, 50)]
    alone = asyncio.run(write_load.run(50, 0.3, 0.001, alone=True))
    assert all(r["writes"] > 0 for r in (*batched, alone))
    assert alone["messages/write"] == 50  # one push per worker and write
    # Each batch carries every worker's write in flight: one push per worker per batch.
    assert max(r["messages/write"] for r in batched) <= 1.5


@pytest.mark.slow  # the benchmark tool's own run (.ci/run's slow part)
def test_write_benchmark_reports_ratios_and_read_back_gets(capsys):
    writes.main(["--workers", "2", "--chunks", "16", "--passes", "1", "--latency-ms", "0"])
    out = capsys.readouterr().out
    assert out.count("| s3 | 2 |") == 3 and out.count("| local | 2 |") == 2
    assert "| s3 | 2 | read back after to_zarr: chunk GETs, cache_writes on / off | 0 | 16 |" in out
