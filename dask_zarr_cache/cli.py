"""The ``dask-zarr-cache`` command: ``demo``, ``stats``, ``warm``, ``status`` and ``evict``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from dask_zarr_cache.demo import DemoOptions, run_demo

    options = DemoOptions(
        workers=args.workers,
        passes=args.passes,
        side=args.side,
        chunk=args.chunk,
        latency_ms=args.latency_ms,
        max_size=args.max_size,
        linger=args.linger,
    )
    results = run_demo(options)
    return 0 if all(r.correct for r in results) else 1


def format_stats(stats: dict) -> str:
    """Render ``cluster_stats`` output as a table, one row per worker plus a total."""
    columns = [
        "hits",
        "misses",
        "remote_reads",
        "remote_bytes",
        "peer_reads",
        "peer_bytes",
        "entries",
        "bytes",
        "evictions",
        "expired",
    ]
    rows = [(addr, c) for addr, c in sorted(stats["workers"].items())]
    rows.append(("total", stats["total"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'worker':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    for name, counters in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{counters.get(c, 0):>14}" for c in columns))
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    from distributed import Client

    from dask_zarr_cache import cluster_stats

    with Client(args.scheduler, timeout=args.timeout) as client:
        stats = cluster_stats(client)
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats))
    return 0


#: Exit codes of the dataset verbs besides 0 (done) and 2 (usage); 130 is the shell's for Ctrl-C.
EXIT_BAD_URL, EXIT_NO_SCHEDULER, EXIT_NO_PLUGIN, EXIT_CANCELLED = 3, 4, 5, 130


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, null, JSON objects
    except ValueError:
        return key, value


def _dataset(args: argparse.Namespace) -> Any:
    """The ``ClusterCacheStore`` of ``args.url``, its metadata read (a bad URL fails here)."""
    from dask_zarr_cache import ClusterCacheStore
    from dask_zarr_cache.datasets import select_arrays

    store = ClusterCacheStore.from_url(args.url, dict(args.storage_option) or None)
    select_arrays(store, getattr(args, "variable", None))  # metadata only
    return store


def _on_dataset(
    args: argparse.Namespace, verb: Callable[[Any, Any], object], cancelled: str = "cancelled"
) -> int:
    """Open the dataset, connect to the scheduler, print ``verb(client, store)``.

    Each failure has its own exit code and a one-line message naming the command;
    ``cancelled`` is the message for Ctrl-C.
    """
    from distributed import Client

    from dask_zarr_cache import ZarrCacheError

    name = f"dask-zarr-cache {args.command}"
    try:
        store = _dataset(args)
    except Exception as err:
        print(f"{name}: cannot read {args.url}: {err}", file=sys.stderr)
        return EXIT_BAD_URL
    try:
        client = Client(args.scheduler, timeout=args.timeout)
    except OSError as err:
        print(f"{name}: cannot reach {args.scheduler}: {err}", file=sys.stderr)
        return EXIT_NO_SCHEDULER
    with client:
        try:
            result = verb(client, store)
        except ZarrCacheError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return EXIT_NO_PLUGIN if "not registered" in str(err) else 1
        except KeyboardInterrupt:
            print(f"{name}: {cancelled}", file=sys.stderr)
            return EXIT_CANCELLED
    print(result)
    return 0


def _warm(args: argparse.Namespace) -> int:
    from dask_zarr_cache import warm

    fit = "trim" if args.trim else "refuse"
    return _on_dataset(
        args,
        lambda client, store: warm(
            client, store, variables=args.variable, concurrency=args.concurrency, fit=fit
        ),
        cancelled="cancelled; what was fetched stays cached",
    )


def _status(args: argparse.Namespace) -> int:
    from dask_zarr_cache import cached

    def status(client: Any, store: Any) -> object:
        found = cached(client, store, args.variable)
        return json.dumps(found.as_dict(), indent=2, sort_keys=True) if args.json else found

    return _on_dataset(args, status)


def _evict(args: argparse.Namespace) -> int:
    from dask_zarr_cache import evict

    return _on_dataset(args, lambda client, store: evict(client, store, args.prefix))


def _dataset_arguments(parser: argparse.ArgumentParser, variables: bool = True) -> None:
    """The URL, its storage options and the scheduler (and ``--variable``) of a verb."""
    parser.add_argument("url", help="fsspec URL or path of a zarr group or array")
    parser.add_argument("--scheduler", required=True, help="scheduler address, e.g. tcp://h:8786")
    if variables:
        parser.add_argument("--variable", action="append", help="array (repeat); default all")
    parser.add_argument(
        "--storage-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeat); VALUE parsed as JSON when it can be",
    )
    parser.add_argument("--timeout", default="10s", help="to reach the scheduler")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dask-zarr-cache`` command."""
    parser = argparse.ArgumentParser(
        prog="dask-zarr-cache", description="One shared Zarr chunk cache for a Dask cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="read a generated dataset from a loopback S3 server, with and without cache"
    )
    demo.add_argument("--workers", type=int, default=3)
    demo.add_argument("--passes", type=int, default=3)
    demo.add_argument("--side", type=int, default=2048, help="array is SIDE x SIDE float32")
    demo.add_argument("--chunk", type=int, default=256, help="chunk edge length")
    demo.add_argument("--latency-ms", type=float, default=20.0, help="added per S3 request")
    demo.add_argument("--max-size", default="1GiB", help="cache budget per worker")
    demo.add_argument("--linger", type=float, default=0.0, help="keep cluster up N seconds")
    demo.set_defaults(run=_demo)

    stats = sub.add_parser("stats", help="print the cache counters of a running cluster")
    stats.add_argument("--scheduler", required=True, help="scheduler address, e.g. tcp://h:8786")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--timeout", default="10s")
    stats.set_defaults(run=_stats)

    warm = sub.add_parser("warm", help="fetch a dataset into the cluster cache before use")
    _dataset_arguments(warm)
    warm.add_argument("--concurrency", type=int, default=8, help="source reads per worker")
    warm.add_argument("--trim", action="store_true", help="warm what fits the free budget")
    warm.set_defaults(run=_warm)

    status = sub.add_parser("status", help="how much of a dataset is cached, per variable")
    _dataset_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=_status)

    evict = sub.add_parser("evict", help="drop a dataset (or a prefix) from the cluster cache")
    _dataset_arguments(evict, variables=False)
    evict.add_argument("--prefix", default="", help="key prefix below the URL; default all")
    evict.set_defaults(run=_evict)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
