"""The benchmark script runs end to end (tiny sizes) and its index micro-benchmark works."""

from __future__ import annotations

from benchmarks import _micro, run


def test_benchmark_runs_every_path_and_reports(tmp_path, capsys):
    argv = ["--workers", "2", "--passes", "2", "--side", "256", "--chunk", "64"]
    argv += ["--latency-ms", "5", "--skip-micro", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    report = (tmp_path / "latest.md").read_text()
    for name in ("no cache", "zarr CacheStore", "simplecache", "dask-zarr-cache", "floor"):
        assert name in report
    assert "remote GETs per unique chunk (dask-zarr-cache): **1.00**" in report
    assert (tmp_path / "latest.png").stat().st_size > 10_000


def test_index_micro_benchmark_measures_throughput_and_memory():
    ops = _micro.index_throughput(5000)
    assert min(ops.values()) > 0
    assert 0 < _micro.index_memory_per_key(5000) < 2000
