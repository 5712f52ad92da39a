"""A real S3 endpoint on loopback for tests, the demo and benchmarks.

:class:`LocalS3Server` runs moto's S3 server (the real S3 HTTP protocol) on 127.0.0.1
in a thread, wrapped in a WSGI middleware that counts requests *at the server*, per
method and per object, and can add a fixed latency to each request.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["LocalS3Server", "RequestCounts", "loopback_cluster"]


def loopback_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs: Any) -> Any:
    """A ``LocalCluster`` of worker processes whose every server binds 127.0.0.1.

    Scheduler, workers and both dashboards listen on loopback only, on free ports.
    """
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        **kwargs,
    )


class RequestCounts:
    """What a server saw: requests per method and path, GETs per object, bytes, service time.

    An *object GET* is a GET of ``<bucket>/<key>`` without a query string. ``service``
    keeps, per object GET, the seconds the server spent on it beyond the latency it adds
    (request in to last byte out, CPU contention included): what a benchmark must keep small.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.methods: Counter[str] = Counter()
        self.object_gets: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bytes_sent = 0
        self.service: deque[float] = deque(maxlen=1_000_000)

    def request(self, method: str, raw_path: str, query: str) -> tuple[str, bool]:
        """Count a request; return its ``"<bucket>/<key>"`` and whether it is an object GET."""
        path = unquote(raw_path).lstrip("/")
        is_object_get = method == "GET" and "/" in path and not query
        with self.lock:
            self.methods[method] += 1
            self.requests[method, path] += 1
            if is_object_get:
                self.object_gets[path] += 1
        return path, is_object_get

    def sent(self, nbytes: int, seconds: float) -> None:
        """Record one object GET answered with ``nbytes`` in ``seconds`` of service time."""
        with self.lock:
            self.bytes_sent += nbytes
            self.service.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """A picklable copy of every count, by attribute name."""
        with self.lock:
            return {
                "methods": Counter(self.methods),
                "requests": Counter(self.requests),
                "object_gets": Counter(self.object_gets),
                "bytes_sent": self.bytes_sent,
                "service": list(self.service),
            }

    def reset(self) -> None:
        """Zero everything."""
        with self.lock:
            self.methods.clear()
            self.object_gets.clear()
            self.requests.clear()
            self.bytes_sent = 0
            self.service.clear()


class _CountingMiddleware:
    """Counts requests (:class:`RequestCounts`) and sleeps ``latency`` before each."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.latency = 0.0
        self.counts = RequestCounts()
        self.faults: dict[str, int] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start = time.perf_counter()
        latency = self.latency
        method = environ["REQUEST_METHOD"]
        path, is_object_get = self.counts.request(
            method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        )
        if latency:
            time.sleep(latency)
        status = self.faults.get(path) if method == "GET" else None
        if status is not None:
            return _error_response(status, start_response)
        body = list(self.app(environ, start_response))
        if not is_object_get:
            return body
        nbytes = sum(len(b) for b in body)
        return _SentBody(
            body, lambda: self.counts.sent(nbytes, time.perf_counter() - start - latency)
        )


class _SentBody(list):
    """A response body whose ``close()`` (called once it is written out) calls ``sent``."""

    def __init__(self, chunks: list[bytes], sent: Callable[[], None]) -> None:
        super().__init__(chunks)
        self._sent = sent

    def close(self) -> None:
        self._sent()


_REASONS = {403: ("Forbidden", "AccessDenied"), 500: ("Internal Server Error", "InternalError")}


def _error_response(status: int, start_response: Callable[..., Any]) -> list[bytes]:
    reason, code = _REASONS.get(status, ("Error", "InternalError"))
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by LocalS3Server</Message></Error>"
    ).encode()
    start_response(
        f"{status} {reason}",
        [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
    )
    return [body]


class LocalS3Server:
    """moto's S3 server on ``127.0.0.1`` with server-side request counting.

    Parameters
    ----------
    port : int
        Port to bind on 127.0.0.1; 0 picks a free one.
    latency : float
        Seconds added to every request (simulates the distance to real S3).

    Examples
    --------
    >>> with LocalS3Server() as s3:  # doctest: +SKIP
    ...     fs = s3.filesystem(); s3.create_bucket("data")
    ...     s3.object_gets["data/x.zarr/c/0"]

    """

    def __init__(self, port: int = 0, latency: float = 0.0) -> None:
        from moto.server import create_backend_app

        # moto's S3 app alone: its all-services dispatcher stats ~180 paths per request
        # to find the service, which costs more than serving the GET.
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: object, **kwargs: object) -> None:
                pass  # one line per request would drown test and demo output

        self._counter = _CountingMiddleware(create_backend_app("s3"))
        self._counter.latency = latency
        self._server = make_server(
            "127.0.0.1", port, self._counter, threaded=True, request_handler=QuietHandler
        )
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (dummy credentials)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": "testing",
            "secret": "testing",
        }

    @property
    def latency(self) -> float:
        """Seconds added to every request."""
        return self._counter.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._counter.latency = float(seconds)

    @property
    def object_gets(self) -> Counter[str]:
        """GET requests per ``"<bucket>/<key>"`` seen by the server (a copy)."""
        with self._counter.counts.lock:
            return Counter(self._counter.counts.object_gets)

    @property
    def requests(self) -> Counter[tuple[str, str]]:
        """Requests per ``(method, "<bucket>/<key>")``, any query string (a copy)."""
        with self._counter.counts.lock:
            return Counter(self._counter.counts.requests)

    @property
    def methods(self) -> Counter[str]:
        """Requests per HTTP method seen by the server (a copy)."""
        with self._counter.counts.lock:
            return Counter(self._counter.counts.methods)

    @property
    def bytes_sent(self) -> int:
        """Bytes of object bodies sent for GETs."""
        return self._counter.counts.bytes_sent

    def fail(self, path: str, status: int | None) -> None:
        """Answer GETs of ``"<bucket>/<key>"`` with HTTP ``status`` (``None`` stops it)."""
        with self._counter.counts.lock:
            if status is None:
                self._counter.faults.pop(path, None)
            else:
                self._counter.faults[path] = status

    def reset_counts(self) -> None:
        """Zero all request counters."""
        self._counter.counts.reset()

    def start(self) -> LocalS3Server:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-s3", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def filesystem(self) -> Any:
        """A synchronous ``s3fs.S3FileSystem`` for this server (no instance caching)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``."""
        self.filesystem().mkdir(name)

    def url(self, path: str) -> str:
        """``s3://<path>``."""
        return f"s3://{path}"
