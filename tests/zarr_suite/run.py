"""Run zarr-python's own tests inside a Dask worker, plain and through ``ClusterCacheStore``.

    python -m tests.zarr_suite.run [--files test_api.py ...] [--timeout S] [-k EXPR]

1. Fetch the sdist of the *installed* zarr (``pip download --no-deps --no-binary :all:``)
   into ``~/.cache/dask-zarr-cache/zarr-sdist-<version>`` (reused when present;
   ``DASK_ZARR_CACHE_ZARR_SDIST_DIR`` overrides) and extract its ``tests/`` and
   ``pyproject.toml`` (zarr's own pytest configuration: ``filterwarnings = error``,
   ``xfail_strict``, ``asyncio_mode = auto``).
2. Pass *plain*: a fresh ``LocalCluster`` (2 worker processes, 1 thread each) with
   ``ZarrCachePlugin`` registered; one task runs ``pytest.main`` on the chosen files in a
   worker, stores as zarr's fixtures build them.
3. Pass *cached*: the same, with every store zarr's fixtures build wrapped in
   ``ClusterCacheStore`` (``wrap_plugin.StoreWrapping``).
4. Re-runs: the tests that fail only in pass 3 run once more in each mode, plain and
   cached.  A test hypothesis reports as flaky (``FlakyFailure``), one that fails in the
   plain re-run too, or one that passes in the cached re-run is not a cache-only failure
   (reported as flaky or as failing without the cache, and not counted).
5. Control: the confirmed cache-only failures run once more wrapped in zarr's plain
   ``WrapperStore`` (no cache).  A test that fails there too fails because *a* wrapper
   hides the store's type (``isinstance(store, ZipStore)`` in the test, ...), not because
   of the cache; it is reported as a wrapping artifact and does not fail the run.

zarr's ``filterwarnings = error`` holds in every pass, except for hypothesis's
``HypothesisDeprecationWarning``: it comes from zarr's test strategies, not the cache.

Each pass is bounded: ``--test-timeout`` per test (pytest-timeout; its thread method ends
the worker process, the pass goes on in a fresh worker without the tests already done and
reports the killed test as ``timeout``) and ``--timeout`` for the whole pass (then the
cluster is closed and the running test reported as ``hang``).

Exit status: 0 when no test fails only with the cache, 1 when some do (or the cached pass
did not finish while the plain one did), 2 on a setup error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

DEFAULT_FILES = ["test_api.py", "test_group.py", "test_array.py", "test_indexing.py"]
PLUGIN_PATH = Path(__file__).with_name("wrap_plugin.py")
#: Tests that cannot run inside a Dask worker at all (deselected in every pass), with why.
WORKER_INCOMPATIBLE = {
    r"test_array\.py::test_multiprocessing\[.*-(spawn|forkserver)\]": (
        "a spawn/forkserver child of a worker re-imports the driver's __main__ "
        "(tests.zarr_suite.run), which zarr's `tests` package shadows there: the pool hangs"
    ),
}
OK = {"passed", "skipped", "xfailed"}
BAD = {"failed", "error", "xpassed", "timeout", "hang", "crashed"}


# -- zarr's tests ------------------------------------------------------------------------
def zarr_tests(version: str | None = None, cache_dir: str | None = None) -> Path:
    """Directory holding zarr's ``tests/`` and ``pyproject.toml`` for ``version``."""
    version = version or installed_version("zarr")
    base = Path(
        cache_dir
        or os.environ.get("DASK_ZARR_CACHE_ZARR_SDIST_DIR")
        or Path.home() / ".cache" / "dask-zarr-cache" / f"zarr-sdist-{version}"
    )
    root = base / f"zarr-{version}"
    if (root / "tests" / "conftest.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    base.mkdir(parents=True, exist_ok=True)
    sdists = sorted(base.glob(f"zarr-{version}.tar.gz"))
    if not sdists:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            f"zarr=={version}",
            "-d",
            str(base),
        ]
        print("fetching zarr sdist:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, timeout=600)
        sdists = sorted(base.glob(f"zarr-{version}.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no zarr-{version}.tar.gz in {base}")
    tmp = Path(tempfile.mkdtemp(dir=base))
    with tarfile.open(sdists[0]) as tar:
        prefix = f"zarr-{version}/"
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml"
        ]
        tar.extractall(tmp, members=members, filter="data")
    if root.exists():
        shutil.rmtree(root)
    (tmp / f"zarr-{version}").rename(root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


# -- one pass ----------------------------------------------------------------------------
def _run_in_worker(plugin_path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Worker task: load wrap_plugin.py by path (``tests`` is zarr's package there)."""
    import importlib.util
    import sys

    name = "_dask_zarr_cache_zarr_suite_plugin"
    spec = importlib.util.spec_from_file_location(name, plugin_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.run_pytest(**kwargs)


if __name__ != "__main__":  # imported: ship _run_in_worker by value, not as tests.zarr_suite
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _read_results(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Results by node id, and the node ids in the order the tests started."""
    results: dict[str, dict[str, Any]] = {}
    started: list[str] = []
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed worker
            if rec.get("event") == "start":
                started.append(rec["nodeid"])
            elif rec.get("event") == "result":
                results[rec["nodeid"]] = rec
    return results, started


def _reap(results_path: Path, workdir: Path) -> int:
    """SIGKILL what zarr's tests forked in our workers and left behind; return how many.

    Only processes in a process group one of our workers led (``worker`` events) *and*
    whose working directory is this pass's ``workdir`` (where the worker task chdir'd).
    """
    import signal

    pgids: set[int] = set()
    with contextlib.suppress(FileNotFoundError), results_path.open(encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("event") == "worker":
                    pgids.add(int(rec["pgid"]))
    killed = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pgrp = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if pgrp not in pgids or int(proc.name) == os.getpid():
                continue
            if not os.readlink(proc / "cwd").startswith(str(workdir)):
                continue
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError, IndexError):
            continue
    return killed


def _running(path: Path, skip: int) -> list[str]:
    """Tests started (after the first ``skip`` starts) that have no result."""
    results, started = _read_results(path)
    return [n for n in started[skip:] if n not in results]


def run_pass(
    mode: str,
    root: Path,
    files: list[str],
    out: Path,
    *,
    name: str | None = None,
    timeout: float,
    test_timeout: float,
    include: list[str] | None = None,
    extra_args: list[str] = (),
    n_workers: int = 2,
    max_restarts: int = 10,
) -> dict[str, Any]:
    """Run zarr's tests in a worker of a fresh cluster; return per-test outcomes.

    ``name`` (default: ``mode``) names the pass's files under ``out``.
    """
    import dask.config
    from distributed import Client, LocalCluster

    from dask_zarr_cache import ZarrCachePlugin, cluster_stats

    name = name or mode
    results_path = out / f"{name}.jsonl"
    log_path = out / f"{name}.log"
    results_path.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    notes: list[str] = []
    summaries: list[dict[str, Any]] = []
    extra: dict[str, dict[str, Any]] = {}  # outcomes the worker could not record itself
    stats: dict[str, Any] | None = None
    finished = False
    workdir = out / f"work-{name}"
    reaped = 0
    # A dead worker must fail the task at once, not rerun the whole suite on the other one;
    # non-daemonic workers, so zarr's test_multiprocessing may start processes.
    # (Kept set for the whole pass: the nanny reads it again when it restarts a worker.)
    settings = contextlib.ExitStack()
    settings.enter_context(
        dask.config.set(
            {"distributed.scheduler.allowed-failures": 0, "distributed.worker.daemon": False}
        )
    )
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit="6GiB",
        silence_logs=logging.CRITICAL,
    )
    client = Client(cluster)
    try:
        client.register_plugin(
            ZarrCachePlugin(max_size="2GiB", directory=str(out / f"cache-{name}"))
        )
        for attempt in range(max_restarts + 1):
            done, started_before = _read_results(results_path)
            kwargs = {
                "zarr_root": str(root),
                "files": files,
                "mode": mode,
                "results_path": str(results_path),
                "log_path": str(log_path),
                "workdir": str(workdir),
                "test_timeout": test_timeout,
                "include": include,
                "exclude": sorted(set(done) | set(extra)),
                "exclude_patterns": list(WORKER_INCOMPATIBLE),
                "extra_args": list(extra_args),
            }
            future = client.submit(
                _run_in_worker,
                str(PLUGIN_PATH),
                kwargs,
                pure=False,
                retries=0,
                key=f"zarr-suite-{name}-{attempt}",
            )
            try:
                summaries.append(future.result(timeout=max(1.0, deadline - time.monotonic())))
                finished = True
                break
            except TimeoutError:
                running = _running(results_path, len(started_before))
                for nodeid in running:
                    extra[nodeid] = {"outcome": "hang", "message": f"pass timeout ({timeout}s)"}
                notes.append(f"pass stopped by its {timeout}s timeout; running: {running}")
                break
            except Exception as err:  # KilledWorker (pytest-timeout ended the worker), ...
                running = _running(results_path, len(started_before))
                reaped += _reap(results_path, workdir)
                notes.append(f"attempt {attempt}: {type(err).__name__}: {err}"[:300])
                if not running:
                    break  # nothing to blame and skip: give up on this pass
                for nodeid in running:
                    extra[nodeid] = {
                        "outcome": "timeout",
                        "message": f"no result; worker died ({type(err).__name__}), "
                        f"test timeout {test_timeout}s",
                    }
        if mode == "cache":
            with contextlib.suppress(Exception):
                stats = cluster_stats(client)["total"]
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=30)
        with contextlib.suppress(Exception):
            cluster.close(timeout=30)
        settings.close()
        reaped += _reap(results_path, workdir)
        if reaped:
            notes.append(f"killed {reaped} processes tests had forked and left behind")
    results, _ = _read_results(results_path)
    for nodeid, rec in extra.items():
        results.setdefault(nodeid, {"nodeid": nodeid, "when": "call", "frames": [], **rec})
    counts = Counter(r["outcome"] for r in results.values())
    return {
        "mode": mode,
        "name": name,
        "finished": finished,
        "seconds": round(time.monotonic() - t0, 1),
        "counts": dict(counts),
        "results": results,
        "notes": notes,
        "worker_summaries": summaries,
        "wrapped_stores": sum(r.get("wrapped", 0) for r in results.values()),
        "tests_with_wrapped_store": sum(1 for r in results.values() if r.get("wrapped")),
        "namespace_reuse": [x for r in results.values() for x in r.get("namespace_reuse", [])],
        "cache_stats": stats,
        "log": str(log_path),
    }


def is_flaky(result: dict[str, Any]) -> bool:
    """Whether hypothesis reported the test's failure as flaky (it failed, then passed)."""
    return "Flaky" in result.get("message", "")


def confirm_cache_only(
    suspects: list[str],
    cached: dict[str, dict[str, Any]],
    plain_rerun: dict[str, dict[str, Any]],
    cached_rerun: dict[str, dict[str, Any]],
) -> dict[str, list[str]]:
    """Sort the tests that failed only in the cached pass by their re-runs in each mode.

    Returns ``{"confirmed": ..., "flaky": ..., "fail_plain": ...}``: ``confirmed`` failed
    in the cached re-run and passed in the plain one; ``fail_plain`` failed in the plain
    re-run (a failure with or without the cache); ``flaky`` is the rest: hypothesis
    reported a flaky failure, or the cached re-run passed (or either re-run gave nothing).
    """
    sorted_: dict[str, list[str]] = {"confirmed": [], "flaky": [], "fail_plain": []}
    for nodeid in suspects:
        plain_again = plain_rerun.get(nodeid, {}).get("outcome")
        cached_again = cached_rerun.get(nodeid, {}).get("outcome")
        if plain_again in BAD:
            sorted_["fail_plain"].append(nodeid)
        elif (
            is_flaky(cached[nodeid])
            or is_flaky(cached_rerun.get(nodeid, {}))
            or plain_again not in OK
            or cached_again not in BAD
        ):
            sorted_["flaky"].append(nodeid)
        else:
            sorted_["confirmed"].append(nodeid)
    return sorted_


def _fmt_counts(p: dict[str, Any]) -> str:
    c = p["counts"]
    parts = [f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "skipped", "error")]
    parts += [f"{c[k]} {k}" for k in ("xfailed", "xpassed", "timeout", "hang") if c.get(k)]
    state = "" if p["finished"] else "  [DID NOT FINISH]"
    return f"{', '.join(parts)} in {p['seconds']:.0f}s{state}"


def _store_param(nodeid: str) -> str:
    """The parametrization id of a node (it names the store fixture's param)."""
    return nodeid.partition("[")[2].rstrip("]") if "[" in nodeid else "-"


def _package_location() -> str:
    import dask_zarr_cache

    return str(Path(dask_zarr_cache.__file__).parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.zarr_suite.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--files",
        nargs="+",
        default=DEFAULT_FILES,
        help="zarr test files, relative to zarr's tests/ (default: %(default)s)",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for both passes")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds for each pass (default %(default)s)"
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=60.0,
        help="seconds for one test (default %(default)s)",
    )
    parser.add_argument("--sdist-dir", help="where to keep zarr's sdist and its tests")
    parser.add_argument("--out", help="directory for logs and results (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", help="write the full comparison here")
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the plain-WrapperStore control of cache-only failures",
    )
    args = parser.parse_args(argv)

    try:
        root = zarr_tests(cache_dir=args.sdist_dir)
    except Exception as err:
        print(f"zarr-suite: could not get zarr's tests: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="zarr-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    extra_args = ["-k", args.keyword] if args.keyword else []
    print(
        f"zarr {installed_version('zarr')} tests from {root}; files: {' '.join(args.files)}"
        f"{' -k ' + args.keyword if args.keyword else ''}; logs in {out}",
        flush=True,
    )
    print(f"dask_zarr_cache from {_package_location()}", flush=True)
    for pattern, why in WORKER_INCOMPATIBLE.items():
        print(f"deselected in every pass: {pattern}: {why}", flush=True)

    common = {"timeout": args.timeout, "test_timeout": args.test_timeout, "extra_args": extra_args}
    plain = run_pass("plain", root, args.files, out, **common)
    print(f"plain : {_fmt_counts(plain)}", flush=True)
    cached = run_pass("cache", root, args.files, out, **common)
    print(f"cached: {_fmt_counts(cached)}", flush=True)
    print(
        f"        {cached['wrapped_stores']} ClusterCacheStore created by fixtures, "
        f"{cached['tests_with_wrapped_store']} tests used one",
        flush=True,
    )
    if cached["cache_stats"]:
        s = cached["cache_stats"]
        print(
            "        cache counters (workers alive at the end): "
            + ", ".join(
                f"{k}={s.get(k, 0)}"
                for k in (
                    "hits",
                    "misses",
                    "remote_reads",
                    "peer_reads",
                    "fallbacks",
                    "disk_errors",
                )
            ),
            flush=True,
        )
    reuse = cached["namespace_reuse"]
    if reuse:
        tests = {x["test"] for x in reuse}
        kinds = Counter(x["store"].split("(")[0].split("<")[-1] for x in reuse)
        print(
            f"        {len(reuse)} wrapped stores in {len(tests)} tests got the cache namespace "
            f"of an earlier test's different store ({dict(kinds)}), e.g. "
            f"{reuse[0]['store']} in {reuse[0]['test']} after {reuse[0]['first_test']}"
        )
    for p in (plain, cached):
        for note in p["notes"]:
            print(f"  note ({p['mode']}): {note}")

    pr, cr = plain["results"], cached["results"]
    only_cache = sorted(
        n for n, r in cr.items() if r["outcome"] in BAD and pr.get(n, {}).get("outcome") in OK
    )
    only_plain = sorted(
        n for n, r in pr.items() if r["outcome"] in BAD and cr.get(n, {}).get("outcome") in OK
    )
    not_run = sorted(n for n in pr if n not in cr) if not cached["finished"] else []

    reruns: dict[str, list[str]] = {"confirmed": only_cache, "flaky": [], "fail_plain": []}
    if only_cache:
        again = {
            mode: run_pass(
                mode, root, args.files, out, name=f"{mode}-rerun", include=only_cache, **common
            )
            for mode in ("plain", "cache")
        }
        for mode, p in again.items():
            print(
                f"re-run ({mode}, the {len(only_cache)} cache-only failures): {_fmt_counts(p)}",
                flush=True,
            )
        reruns = confirm_cache_only(
            only_cache, cr, again["plain"]["results"], again["cache"]["results"]
        )
        for n in reruns["flaky"]:
            print(f"  FLAKY      {n}\n      {cr[n]['outcome']}: {cr[n]['message']}")
        for n in reruns["fail_plain"]:
            print(f"  NOT-CACHE  {n}\n      failed in the plain re-run too: {cr[n]['message']}")
        only_cache = reruns["confirmed"]

    control: dict[str, Any] | None = None
    if only_cache and not args.no_control:
        control = run_pass("wrapper", root, args.files, out, include=only_cache, **common)
        print(
            f"control (plain WrapperStore, the {len(only_cache)} cache-only failures): "
            f"{_fmt_counts(control)}",
            flush=True,
        )
    artifacts = [
        n for n in only_cache if control and control["results"].get(n, {}).get("outcome") in BAD
    ]
    real = [n for n in only_cache if n not in artifacts]

    print(
        f"\ntests failing only with the cache: {len(real)}"
        f" (+{len(artifacts)} that fail with any wrapper too)"
    )
    for n in real:
        r = cr[n]
        frame = f"  @ {r['frames'][-1]}" if r.get("frames") else ""
        print(
            f"  CACHE-ONLY {n}\n      store={_store_param(n)} {r['outcome']} in {r['when']}: "
            f"{r['message']}{frame}"
        )
    for n in artifacts:
        r = cr[n]
        print(f"  WRAPPER    {n}\n      {r['outcome']} in {r['when']}: {r['message']}")
    if only_plain:
        print(f"tests failing only WITHOUT the cache: {len(only_plain)}")
        for n in only_plain:
            print(f"  {n}: {pr[n]['outcome']}: {pr[n]['message']}")
    if not_run:
        print(f"tests the cached pass did not reach: {len(not_run)}")

    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps(
                {
                    "plain": plain,
                    "cached": cached,
                    "control": control,
                    "only_cache": real,
                    "rerun_flaky": reruns["flaky"],
                    "rerun_fail_plain": reruns["fail_plain"],
                    "wrapper_artifacts": artifacts,
                    "only_plain": only_plain,
                    "not_run": not_run,
                },
                indent=1,
                default=str,
            )
        )
    failed = bool(real) or (plain["finished"] and not cached["finished"])
    c = cached["counts"]
    print(
        f"zarr-suite (zarr {installed_version('zarr')}, hypothesis "
        f"{installed_version('hypothesis')}, pytest {installed_version('pytest')}): "
        f"plain {sum(plain['counts'].values())} tests run, cached "
        f"{sum(c.values())} run: {c.get('passed', 0)} passed, "
        f"{c.get('failed', 0) + c.get('error', 0)} failed, {c.get('skipped', 0)} skipped; "
        f"cache-only failures {len(real)} (re-runs: {len(reruns['flaky'])} flaky, "
        f"{len(reruns['fail_plain'])} failed plain too)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
