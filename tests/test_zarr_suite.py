"""zarr-python's own tests through the cluster cache: no test may fail only with the cache.

Runs ``python -m tests.zarr_suite.run`` (see its docstring): zarr's test_api, test_group,
test_array and test_indexing run inside a Dask worker with ``ZarrCachePlugin`` registered,
once plain and once with every store zarr's fixtures build wrapped in
``ClusterCacheStore``.  Selected with ``pytest -m zarr_suite`` only; it needs PyPI for the
zarr sdist on the first run (then cached under ``~/.cache/dask-zarr-cache``).

``DASK_ZARR_CACHE_ZARR_SUITE_FILES`` (space-separated) and ``DASK_ZARR_CACHE_ZARR_SUITE_K``
(a pytest ``-k`` expression) narrow the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.zarr_suite.run import confirm_cache_only

REPO = Path(__file__).resolve().parent.parent
FILES = ["test_api.py", "test_group.py", "test_array.py", "test_indexing.py"]
PASS_TIMEOUT = 600  # seconds for each of the (up to) five passes
TEST_TIMEOUT = 60  # seconds for one zarr test (a hang ends its worker; the pass goes on)


@pytest.mark.zarr_suite
@pytest.mark.timeout(6 * PASS_TIMEOUT)
def test_zarr_suite_through_cache(tmp_path: Path) -> None:
    files = os.environ.get("DASK_ZARR_CACHE_ZARR_SUITE_FILES", "").split() or FILES
    keyword = os.environ.get("DASK_ZARR_CACHE_ZARR_SUITE_K")
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable, "-m", "tests.zarr_suite.run",
        "--files", *files,
        "--timeout", str(PASS_TIMEOUT),
        "--test-timeout", str(TEST_TIMEOUT),
        "--out", str(tmp_path / "out"),
        "--json", str(summary),
    ]  # fmt: skip
    if keyword:
        cmd += ["-k", keyword]
    # Output to a file, not a pipe: a process a zarr test forks may outlive its worker.
    log = tmp_path / "run.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=6 * PASS_TIMEOUT - 60
        )
    output = log.read_text()
    print(output)
    assert proc.returncode in (0, 1), f"the zarr suite did not run:\n{output[-3000:]}"
    result = json.loads(summary.read_text())
    plain, cached = result["plain"], result["cached"]
    assert plain["finished"], f"plain pass did not finish:\n{output[-3000:]}"
    # The wrapping must really have happened, and the cache must really have been used.
    assert cached["tests_with_wrapped_store"] > 0.1 * len(cached["results"]), output[-3000:]
    assert (cached["cache_stats"] or {}).get("misses", 0) > 0, output[-3000:]
    assert not result["only_cache"], f"tests fail only with the cache:\n{output[-6000:]}"
    assert proc.returncode == 0, output[-3000:]


def _outcomes(**by_test: str) -> dict[str, dict[str, str]]:
    return {n: {"outcome": o, "message": ""} for n, o in by_test.items()}


def test_a_cache_only_failure_counts_only_when_both_reruns_agree():
    cached = _outcomes(real="failed", flaky="failed", both="failed", lucky="failed")
    cached["flaky"]["message"] = "hypothesis.errors.FlakyFailure: Hypothesis test ..."
    plain_rerun = _outcomes(real="passed", flaky="passed", both="failed", lucky="passed")
    cached_rerun = _outcomes(real="failed", flaky="failed", both="failed", lucky="passed")
    sorted_ = confirm_cache_only(list(cached), cached, plain_rerun, cached_rerun)
    assert sorted_ == {"confirmed": ["real"], "flaky": ["flaky", "lucky"], "fail_plain": ["both"]}


def test_a_test_the_reruns_did_not_reach_is_not_confirmed():
    cached = _outcomes(gone="failed")
    assert confirm_cache_only(["gone"], cached, {}, {})["confirmed"] == []
