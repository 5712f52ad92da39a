"""The benchmark's S3 endpoint: moto's S3 protocol from several processes, over a snapshot.

moto in a thread of the benchmark's own process (``LocalS3Server``, what tests use)
shares one interpreter lock with the Dask scheduler and the client, and werkzeug and
Flask cost milliseconds per request there: measured, 3-6 ms beyond a 20 ms latency at 8
readers, which inflates every S3-bound number. Here:

- the dataset, written to a local directory first, is loaded into moto (its S3 app, by
  real PUT requests) in a process of its own, which then forks ``processes`` servers
  that all accept on one listening socket on 127.0.0.1;
- each server is aiohttp (HTTP parsed in C, the latency an ``asyncio.sleep``, no thread
  per connection) in front of moto: HEAD and LIST go to moto as they come, and a GET of
  an object, plain or of one byte range, is answered from moto's own response to the
  plain GET, taken once at load (the snapshot is read-only, so it never changes): a
  one-GET read that asks for ``bytes=0-`` costs what a plain GET costs;
- each server records, per object GET, the seconds it spent beyond the latency (request
  in to last byte out), so the benchmark prints what the endpoint itself adds.

Writes are refused (405): in a forked snapshot one would land in one process only.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_zarr_cache.testing import RequestCounts

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from aiohttp import web

# moto checks no signature; an authenticated-looking request just skips anonymous ACLs.
_AUTH = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=0"
}
# Set by the HTTP server itself for the body it sends.
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "server", "date"}

Reply = tuple[int, list[tuple[str, str]], bytes]


def _moto(app: Any, method: str, path: str, query: str, headers: Any, body: bytes) -> Reply:
    """One request through moto's WSGI app: status, headers and body."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder(
        method=method, path=path, query_string=query, headers=list(headers.items()), data=body
    ).get_environ()
    chunks, status, reply_headers = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), list(reply_headers.items()), b"".join(chunks)


def _load(app: Any, root: Path) -> dict[str, Reply]:
    """PUT every file under ``root/<bucket>/`` into moto; return its GET reply per object."""
    headers = {**_AUTH, "Host": "127.0.0.1"}
    replies = {}
    for bucket in sorted(p for p in root.iterdir() if p.is_dir()):
        assert _moto(app, "PUT", f"/{bucket.name}", "", headers, b"")[0] == 200
        for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
            name = f"{bucket.name}/{path.relative_to(bucket).as_posix()}"
            status = _moto(app, "PUT", f"/{name}", "", headers, path.read_bytes())[0]
            assert status == 200, (name, status)
            replies[name] = _moto(app, "GET", f"/{name}", "", headers, b"")
    return replies


def _ranged(whole: Reply, header: str) -> Reply | None:
    """The reply to a GET of ``bytes=START-[END]`` of an object whose whole GET is ``whole``.

    What S3 answers (206, ``Content-Range``), cut from the snapshot as a plain GET is;
    ``None`` for anything else (several ranges, suffixes, unsatisfiable: moto answers).
    """
    status, headers, body = whole
    unit, _, spec = header.partition("=")
    first, dash, last = spec.partition("-")
    if status != 200 or unit.strip() != "bytes" or not dash or not first.isdigit():
        return None
    start, end = int(first), (int(last) if last.isdigit() else len(body) - 1)
    if start >= len(body) or end < start:
        return None
    part = body[start : min(end, len(body) - 1) + 1]
    kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-range")]
    content_range = f"bytes {start}-{start + len(part) - 1}/{len(body)}"
    return 206, [*kept, ("Content-Range", content_range)], part


class _Endpoint:
    """One server process's request handler and its counts."""

    def __init__(self, app: Any, replies: dict[str, Reply], latency: float) -> None:
        self.app = app
        self.replies = replies
        self.latency = latency
        self.counts = RequestCounts()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        start, latency = time.perf_counter(), self.latency
        path, is_object_get = self.counts.request(
            request.method, request.rel_url.raw_path, request.query_string
        )
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="read-only benchmark snapshot")
        if latency:
            await asyncio.sleep(latency)
        known = self.replies.get(path) if is_object_get else None
        if known is not None and "Range" in request.headers:
            known = _ranged(known, request.headers["Range"])
        status, headers, body = known or _moto(
            self.app,
            request.method,
            request.rel_url.raw_path,
            request.query_string,
            request.headers,
            await request.read(),
        )
        length = next((v for k, v in headers if k.lower() == "content-length"), str(len(body)))
        reply = web.StreamResponse(status=status)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP:
                reply.headers.add(key, value)
        reply.content_length = int(length)
        await reply.prepare(request)
        if request.method == "GET":
            await reply.write(body)
        await reply.write_eof()
        if is_object_get:
            self.counts.sent(len(body), time.perf_counter() - start - latency)
        return reply

    def command(self, command: str, arg: Any) -> dict[str, Any]:
        """Apply a command of the parent; reply with a snapshot of the counts."""
        if command == "latency":
            self.latency = arg
        elif command == "reset":
            self.counts.reset()
        return self.counts.snapshot()


async def _serve(sock: socket.socket, endpoint: _Endpoint, conn: Connection) -> None:
    """Serve on ``sock`` until the parent says stop (or goes away)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def on_command() -> None:
        try:
            command, arg = conn.recv()
        except (EOFError, OSError):  # the parent is gone: stop with it
            command, arg = "stop", None
        if command == "stop":
            loop.remove_reader(conn.fileno())
            stopped.set_result(None)
        else:
            conn.send(endpoint.command(command, arg))

    loop.add_reader(conn.fileno(), on_command)
    conn.send(("ready", sock.getsockname()[1]))
    await stopped
    await runner.cleanup()


def _main(root: str, conns: list[Connection], latency: float) -> None:
    """Load the snapshot, then fork one server per connection (this process serves the first)."""
    from moto.server import create_backend_app

    # moto spills objects over 5 MiB to a temporary file; after fork, processes would share
    # its file offset and read each other's positions. In memory, each has its own copy.
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(2**40)
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    sock.setblocking(False)
    app = create_backend_app("s3")
    replies = _load(app, Path(root))
    children = []
    for conn in conns[1:]:
        pid = os.fork()  # no thread and no event loop exist yet: forking is safe
        if pid == 0:
            asyncio.run(_serve(sock, _Endpoint(app, replies, latency), conn))
            os._exit(0)
        children.append(pid)
    asyncio.run(_serve(sock, _Endpoint(app, replies, latency), conns[0]))
    for pid in children:
        os.waitpid(pid, 0)


@dataclass(frozen=True)
class ServiceTimes:
    """What the endpoint added beyond the configured latency, over ``n`` object GETs."""

    n: int
    mean_ms: float
    p99_ms: float
    latency_ms: float

    @property
    def too_slow(self) -> bool:
        """True when the mean excess is more than 10% of the latency it pretends to be."""
        return self.mean_ms > 0.1 * self.latency_ms

    def __str__(self) -> str:
        line = (
            f"S3 endpoint excess over the {self.latency_ms:g} ms latency: mean "
            f"{self.mean_ms:.2f} ms, p99 {self.p99_ms:.2f} ms ({self.n} object GETs)"
        )
        if self.too_slow:
            line += " -- WARNING: over 10% of the latency; S3-bound numbers are inflated"
        return line


class ParallelS3Server:
    """moto's S3 protocol on 127.0.0.1 from ``processes`` processes, over a snapshot of ``root``.

    Every directory directly under ``root`` is a bucket; files below it are its objects.
    Offers the read side of :class:`~dask_zarr_cache.testing.LocalS3Server`'s interface.
    """

    def __init__(self, root: str | os.PathLike[str], processes: int = 2, latency: float = 0.0):
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe() for _ in range(processes)]
        self._conns = [mine for mine, _ in pipes]
        self._latency = float(latency)
        self._process = context.Process(
            target=_main,
            args=(str(root), [theirs for _, theirs in pipes], self._latency),
            name="bench-s3",
            daemon=True,
        )
        self._process.start()
        for _, theirs in pipes:
            theirs.close()
        ports = {conn.recv()[1] for conn in self._conns}
        (self._port,) = ports

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (dummy credentials)."""
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def _ask(self, command: str, arg: Any = None) -> dict[str, Any]:
        """Send ``command`` to every server process; return their counts, summed."""
        for conn in self._conns:
            conn.send((command, arg))
        total: dict[str, Any] = {}
        for conn in self._conns:
            for name, value in conn.recv().items():
                total[name] = total[name] + value if name in total else value
        return total

    @property
    def latency(self) -> float:
        """Seconds added to every request."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._latency = float(seconds)
        self._ask("latency", self._latency)

    def counts(self) -> dict[str, Any]:
        """Every count of every server process, summed, in one snapshot (see
        :meth:`~dask_zarr_cache.testing.RequestCounts.snapshot`)."""
        return self._ask("stats")

    @property
    def object_gets(self) -> Counter[str]:
        """GET requests per ``"<bucket>/<key>"`` over all server processes."""
        return self.counts()["object_gets"]

    @property
    def requests(self) -> Counter[tuple[str, str]]:
        """Requests per ``(method, "<bucket>/<key>")`` over all server processes."""
        return self.counts()["requests"]

    @property
    def bytes_sent(self) -> int:
        """Bytes of object bodies sent for GETs."""
        return self.counts()["bytes_sent"]

    def service_times(self) -> ServiceTimes:
        """Mean and p99 of the time spent per object GET beyond the latency, so far."""
        excess = np.array(self.counts()["service"]) * 1000
        return ServiceTimes(
            n=len(excess),
            mean_ms=float(excess.mean()) if len(excess) else 0.0,
            p99_ms=float(np.percentile(excess, 99)) if len(excess) else 0.0,
            latency_ms=self._latency * 1000,
        )

    def reset_counts(self) -> None:
        """Zero the counters and service times of every server process."""
        self._ask("reset")

    def stop(self) -> None:
        """Stop every server process."""
        for conn in self._conns:
            conn.send(("stop", None))
            conn.close()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()

    def __enter__(self) -> ParallelS3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
