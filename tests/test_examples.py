"""The runnable examples, with the loopback S3 server standing in for S3."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from tests.conftest import chunk_gets, s3_store, write_array

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so worker processes can unpickle what it defines
    spec.loader.exec_module(module)
    return module


def test_quickstart_reads_each_chunk_once(s3, s3_path, capsys):
    data = np.random.default_rng(50).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    s3.reset_counts()
    argv = ["--url", f"s3://{s3_path}", "--workers", "2", "--passes", "3"]
    assert load("quickstart").main(argv, storage_options=s3.storage_options) == 0
    out = capsys.readouterr().out
    assert out.count(f"sum={data.astype('f8').sum():.6g}") == 3
    assert "remote reads 16," in out
    assert set(chunk_gets(s3, s3_path).values()) == {1}


def test_quickstart_runs_on_its_own_data(capsys):
    assert load("quickstart").main(["--workers", "2", "--passes", "2"]) == 0
    out = capsys.readouterr().out
    assert "64 chunks" in out and "remote reads 64," in out


def test_xarray_example_computes_and_caches(s3, s3_path, capsys):
    rng = np.random.default_rng(51)
    ds = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), rng.random((8, 10, 20)))},
        coords={"time": np.arange(8), "lat": np.linspace(-45, 45, 10), "lon": np.arange(20.0)},
    )
    ds.chunk({"time": 4, "lat": 5, "lon": 10}).to_zarr(s3_store(s3, s3_path), mode="w")
    s3.reset_counts()
    assert (
        load("xarray_s3").main(["--url", f"s3://{s3_path}"], storage_options=s3.storage_options)
        == 0
    )
    out = capsys.readouterr().out
    assert "remote reads 8," in out
    gets = {k: n for k, n in chunk_gets(s3, s3_path).items() if "/temperature/" in k}
    assert len(gets) == 8 and set(gets.values()) == {1}
