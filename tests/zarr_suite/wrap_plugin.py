"""pytest plugins for running zarr-python's own tests inside a Dask worker task.

This file is loaded *by file path* inside the worker (see :func:`run_pytest`), never as
``tests.zarr_suite.wrap_plugin``: in that process the name ``tests`` belongs to zarr's
test package, which imports itself as ``tests.conftest``.

Plugins:

* :class:`StoreWrapping` wraps every store zarr's fixtures hand to a test in
  ``ClusterCacheStore`` (mode ``"cache"``) or in zarr's plain delegating
  ``WrapperStore`` (mode ``"wrapper"``, the control that tells wrapping artifacts from
  cache bugs).  It patches ``parse_store`` of zarr's ``tests/conftest.py`` (used by the
  ``store``, ``store2``, ``sync_store`` and ``async_group`` fixtures and by some tests
  directly) and wraps any other fixture value that is a ``Store`` or a ``StorePath``
  (``local_store``, ``memory_store``, ``zip_store``, ``store_path``, ...).  Stores a test
  builds inline stay unwrapped.
* :class:`OutcomeRecorder` appends one JSON line per test start and per test result to
  a file, flushed at once, so a run whose worker dies still tells what it did.
* :class:`Selector` keeps only (or drops) the given node ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any

import pytest
from zarr.abc.store import Store
from zarr.storage import StorePath, WrapperStore

MODES = ("plain", "cache", "wrapper")


class ControlWrapperStore(WrapperStore[Store]):
    """zarr's own delegating wrapper, no cache: the control for wrapping artifacts."""


def _wrapper_class(mode: str) -> type[Store] | None:
    if mode == "cache":
        from dask_zarr_cache import ClusterCacheStore

        return ClusterCacheStore
    if mode == "wrapper":
        return ControlWrapperStore
    if mode == "plain":
        return None
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


class StoreWrapping:
    """Wrap the stores zarr's test fixtures build."""

    def __init__(self, mode: str) -> None:
        self.wrapper_cls = _wrapper_class(mode)
        self.created = 0
        self.per_test: dict[str, int] = {}
        self.current: str | None = None
        self._patched: list[tuple[Any, Any]] = []
        # cache namespace -> (test that first used it, repr of its source store)
        self._namespaces: dict[str, tuple[str | None, str]] = {}
        self.namespace_reuse: list[dict[str, str]] = []

    def wrap(self, store: Any) -> Any:
        if self.wrapper_cls is None or not isinstance(store, Store):
            return store
        if isinstance(store, self.wrapper_cls):
            return store
        wrapped = self.wrapper_cls(store)
        self.created += 1
        if self.current is not None:
            self.per_test[self.current] = self.per_test.get(self.current, 0) + 1
        self._check_namespace(wrapped, store)
        return wrapped

    def _check_namespace(self, wrapped: Any, source: Any) -> None:
        """Note a cache namespace (and root) an earlier test's *different* source store had.

        Two sources sharing a namespace share cache entries: a later test can then be
        served the bytes an earlier test wrote.  (Holding the earlier source alive here
        would hide the reuse of ``id()``-based names, so only its repr is kept.)
        """
        namespace = getattr(wrapped, "namespace", None)
        if namespace is None:
            return
        location = getattr(wrapped, "location", None)  # namespace + root, where it has one
        if location is not None:
            namespace = f"{namespace}:{getattr(location, 'root', '')}"
        first = self._namespaces.get(namespace)
        if first is None:
            self._namespaces[namespace] = (self.current, repr(source))
        elif first[0] != self.current:
            self.namespace_reuse.append(
                {
                    "namespace": namespace,
                    "test": str(self.current),
                    "store": repr(source),
                    "first_test": str(first[0]),
                    "first_store": first[1],
                }
            )

    def wrap_value(self, value: Any) -> Any:
        if isinstance(value, Store):
            return self.wrap(value)
        if isinstance(value, StorePath) and self.wrapper_cls is not None:
            if isinstance(value.store, Store) and not isinstance(value.store, self.wrapper_cls):
                return StorePath(self.wrap(value.store), value.path)
        return value

    # zarr's conftest: patch parse_store as soon as pytest registers the module, before
    # any test module runs ``from .conftest import parse_store``.
    @pytest.hookimpl
    def pytest_plugin_registered(self, plugin: Any) -> None:
        name = getattr(plugin, "__name__", "")
        original = getattr(plugin, "parse_store", None)
        if self.wrapper_cls is None or not name.endswith("conftest") or original is None:
            return
        if getattr(original, "_dzc_wrapped", False):
            return
        wrapping = self

        async def parse_store(*args: Any, **kwargs: Any) -> Any:
            return wrapping.wrap(await original(*args, **kwargs))

        parse_store._dzc_wrapped = True  # type: ignore[attr-defined]
        parse_store.__wrapped__ = original  # type: ignore[attr-defined]
        plugin.parse_store = parse_store
        self._patched.append((plugin, original))

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Any:
        result = yield
        new = self.wrap_value(result)
        if new is not result:
            cached = fixturedef.cached_result
            if cached is not None and cached[0] is result:
                fixturedef.cached_result = (new, *cached[1:])
        return new

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.current = nodeid

    def unpatch(self) -> None:
        for module, original in self._patched:
            module.parse_store = original
        self._patched.clear()


def _message(report: Any) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # skip: (path, lineno, reason)
        return str(longrepr[-1])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.strip().splitlines()[0] if crash.message.strip() else ""
    lines = [ln for ln in str(longrepr).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _package_frames(report: Any) -> list[str]:
    """Traceback lines inside dask_zarr_cache (where a cache bug surfaces)."""
    text = getattr(report, "longreprtext", "") or ""
    frames = []
    for line in text.splitlines():
        if "dask_zarr_cache" in line and ".py:" in line:
            frames.append(line.strip())
    return frames[-3:]


class OutcomeRecorder:
    """One JSON line per test start and per finished test, flushed immediately."""

    def __init__(self, path: str, wrapping: StoreWrapping | None = None) -> None:
        self._fh = open(path, "a", buffering=1, encoding="utf-8")
        self.wrapping = wrapping
        self.reports: dict[str, list[Any]] = {}
        self.counts: dict[str, int] = {}
        self._t0: dict[str, float] = {}
        self._reuse_seen = 0

    def _write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    @pytest.hookimpl
    def pytest_collection_finish(self, session: Any) -> None:
        self._write(event="collected", n=len(session.items), pid=os.getpid())

    @pytest.hookimpl
    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write(
                event="result",
                nodeid=report.nodeid,
                outcome="error",
                when="collect",
                message=_message(report),
                frames=_package_frames(report),
            )

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.reports[nodeid] = []
        self._t0[nodeid] = time.monotonic()
        self._write(event="start", nodeid=nodeid)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: Any) -> None:
        self.reports.setdefault(report.nodeid, []).append(report)

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        reports = self.reports.pop(nodeid, [])
        outcome, when, message, frames = "passed", "call", "", []
        for rep in reports:
            wasxfail = hasattr(rep, "wasxfail")
            if rep.when == "call":
                if rep.failed:
                    outcome = "failed"
                elif rep.skipped:
                    outcome = "xfailed" if wasxfail else "skipped"
                else:
                    outcome = "xpassed" if wasxfail else "passed"
            elif rep.failed:  # setup or teardown
                outcome = "error"
            elif rep.skipped and rep.when == "setup":
                outcome = "xfailed" if wasxfail else "skipped"
            else:
                continue
            when, message, frames = rep.when, _message(rep), _package_frames(rep)
            if outcome in ("failed", "error"):
                break
        wrapped = self.wrapping.per_test.get(nodeid, 0) if self.wrapping else 0
        reuse = self.wrapping.namespace_reuse[self._reuse_seen :] if self.wrapping else []
        self._reuse_seen += len(reuse)
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self._write(
            event="result",
            nodeid=nodeid,
            outcome=outcome,
            when=when,
            message=message[:500],
            frames=frames,
            wrapped=wrapped,
            seconds=round(time.monotonic() - self._t0.pop(nodeid, time.monotonic()), 3),
            namespace_reuse=reuse,
        )


class Selector:
    """Keep only ``include`` (if given) and drop ``exclude`` from the collected tests."""

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] = (),
        exclude_patterns: list[str] = (),
    ) -> None:
        self.include = set(include) if include is not None else None
        self.exclude = set(exclude)
        self.patterns = [re.compile(p) for p in exclude_patterns]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        keep, drop = [], []
        for item in items:
            selected = (
                (self.include is None or item.nodeid in self.include)
                and item.nodeid not in self.exclude
                and not any(p.search(item.nodeid) for p in self.patterns)
            )
            (keep if selected else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


class FaulthandlerOptions:
    """Declares the ini options of pytest's faulthandler plugin, which is off here.

    It is process-global (it would take over the worker's fault handler and stderr), and
    zarr >= 3.2's configuration sets its options in strict mode, where an option no
    plugin declares is an error that ends the run before any test.
    """

    def pytest_addoption(self, parser: pytest.Parser) -> None:
        parser.addini("faulthandler_timeout", "declared only (faulthandler is off)", default="0")
        parser.addini("faulthandler_exit_on_timeout", "declared only", type="bool", default=False)


def run_pytest(
    *,
    zarr_root: str,
    files: list[str],
    mode: str,
    results_path: str,
    log_path: str,
    workdir: str,
    test_timeout: float,
    include: list[str] | None = None,
    exclude: list[str] = (),
    exclude_patterns: list[str] = (),
    extra_args: list[str] = (),
) -> dict[str, Any]:
    """Run zarr's tests with pytest in *this* process (meant to be a Dask worker task)."""
    from distributed import get_worker

    worker = get_worker()  # fails loudly if this is not a worker task
    cache_installed = "zarr_cache" in getattr(worker, "extensions", {})

    # Own process group, so the driver can end what a test forks and leaves behind when
    # this worker dies (a forked child blocked on the worker's loop outlives it).
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with open(results_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "worker", "pid": os.getpid(), "pgid": os.getpgid(0)}) + "\n")

    # In this process the name ``tests`` must be zarr's test package.
    for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
        del sys.modules[name]
    sys.path.insert(0, zarr_root)
    old_cwd = os.getcwd()
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)  # tests that write relative paths write here

    wrapping = StoreWrapping(mode)
    recorder = OutcomeRecorder(results_path, wrapping)
    selector = Selector(include, list(exclude), list(exclude_patterns))
    plugins = [wrapping, recorder, selector, FaulthandlerOptions()]
    args = [
        "-c",
        os.path.join(zarr_root, "pyproject.toml"),
        "--rootdir",
        zarr_root,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:faulthandler",  # process-global; leave the worker's alone
        "--capture=sys",  # fd capture would steal the worker process's stdout/stderr
        "--timeout",
        str(test_timeout),
        "--timeout-method=thread",  # signals only work in the main thread
        "-q",
        # zarr (and its pytest11 entry point) is imported in the worker already
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
        # zarr's configuration makes every warning an error; hypothesis's deprecations of
        # what zarr's own strategies do (6.170: the `random` module inside strategies) say
        # nothing about the cache. Every other warning stays an error.
        "-W",
        "ignore::hypothesis.errors.HypothesisDeprecationWarning",
        *extra_args,
        *[os.path.join(zarr_root, "tests", f) for f in files],
    ]
    t0 = time.monotonic()
    try:
        with (
            open(log_path, "a", encoding="utf-8") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            print(f"== pytest {' '.join(args)}", flush=True)
            exit_code = int(pytest.main(args, plugins=plugins))
    finally:
        wrapping.unpatch()
        recorder.close()
        os.chdir(old_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(zarr_root)
    return {
        "exit_code": exit_code,
        "seconds": round(time.monotonic() - t0, 1),
        "worker": worker.address,
        "pid": os.getpid(),
        "cache_installed": cache_installed,
        "wrapped_stores": wrapping.created,
        "tests_with_wrapped_store": len(wrapping.per_test),
        "namespace_reuse": wrapping.namespace_reuse,
        "counts": recorder.counts,
    }
