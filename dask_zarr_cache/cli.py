"""The ``dask-zarr-cache`` command: ``demo``, ``stats`` and ``warm``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

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


#: Exit codes of ``warm`` besides 0 (done) and 2 (usage); 130 is the shell's for Ctrl-C.
EXIT_BAD_URL, EXIT_NO_SCHEDULER, EXIT_NO_PLUGIN, EXIT_CANCELLED = 3, 4, 5, 130


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, null, JSON objects
    except ValueError:
        return key, value


def _warm(args: argparse.Namespace) -> int:
    from distributed import Client

    from dask_zarr_cache import ClusterCacheStore, ZarrCacheError, warm

    try:
        store = ClusterCacheStore.from_url(args.url, dict(args.storage_option) or None)
        from dask_zarr_cache.warmup import select_arrays

        select_arrays(store, args.variable)  # a bad URL or variable fails here (metadata only)
    except Exception as err:
        print(f"dask-zarr-cache warm: cannot read {args.url}: {err}", file=sys.stderr)
        return EXIT_BAD_URL
    try:
        client = Client(args.scheduler, timeout=args.timeout)
    except OSError as err:
        print(f"dask-zarr-cache warm: cannot reach {args.scheduler}: {err}", file=sys.stderr)
        return EXIT_NO_SCHEDULER
    with client:
        try:
            report = warm(
                client,
                store,
                variables=args.variable,
                concurrency=args.concurrency,
                fit="trim" if args.trim else "refuse",
            )
        except ZarrCacheError as err:
            print(f"dask-zarr-cache warm: {err}", file=sys.stderr)
            return EXIT_NO_PLUGIN if "not registered" in str(err) else 1
        except KeyboardInterrupt:
            print("dask-zarr-cache warm: cancelled; what was fetched stays cached", file=sys.stderr)
            return EXIT_CANCELLED
    print(report)
    return 0


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
    warm.add_argument("url", help="fsspec URL or path of a zarr group or array")
    warm.add_argument("--scheduler", required=True, help="scheduler address, e.g. tcp://h:8786")
    warm.add_argument("--variable", action="append", help="array to warm (repeat); default all")
    warm.add_argument(
        "--storage-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeat); VALUE parsed as JSON when it can be",
    )
    warm.add_argument("--concurrency", type=int, default=8, help="source reads per worker")
    warm.add_argument("--trim", action="store_true", help="warm what fits the free budget")
    warm.add_argument("--timeout", default="10s", help="to reach the scheduler")
    warm.set_defaults(run=_warm)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
