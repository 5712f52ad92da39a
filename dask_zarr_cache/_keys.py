"""Cache keys: source namespaces, zarr key validation and byte-range entries.

A cache key is ``<namespace>/<zarr key>`` for a whole object and
``<namespace>/<zarr key>#<range spec>`` for a byte range of it.  The cache key is also the
object's path below a worker's cache directory, so validation here is what keeps every
cache file inside that directory.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from dask_zarr_cache._exceptions import InvalidCacheKeyError

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store

__all__ = ["RANGE_SEPARATOR", "base_key", "cache_key", "namespace_of", "validate_key"]

#: Separates a zarr key from the byte-range spec in a range entry's cache key.
RANGE_SEPARATOR = "#"


def _store_identity(store: Store) -> list[object]:
    """What makes two stores the same data source, as a JSON-able list."""
    kind = f"{type(store).__module__}.{type(store).__qualname__}"
    if isinstance(store, WrapperStore):
        return [kind, _store_identity(store._store)]
    fs = getattr(store, "fs", None)
    if fs is not None:  # FsspecStore: the filesystem's options hold the endpoint
        protocol = fs.protocol if isinstance(fs.protocol, str) else list(fs.protocol)
        options = getattr(fs, "storage_options", {})
        return [kind, protocol, getattr(store, "path", ""), options]
    return [kind, str(store)]


def namespace_of(store: Store) -> str:
    """Return a stable token naming the data behind ``store``.

    Two stores reading the same data (same class, filesystem options and path) share a
    namespace and so share cache entries; any difference gives a different namespace.
    Credentials take part only as a hash, never in clear.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The source store.

    Returns
    -------
    str
        ``"ns-"`` followed by 20 hex digits.

    """
    identity = json.dumps(_store_identity(store), sort_keys=True, default=repr)
    return "ns-" + hashlib.sha256(identity.encode()).hexdigest()[:20]


def validate_key(key: str) -> str:
    """Check that a zarr key is a relative path that stays below its namespace.

    Raises
    ------
    InvalidCacheKeyError
        If the key is empty, absolute, has ``.``/``..``/empty components, a backslash or
        a control character (NUL included).

    """
    if not isinstance(key, str) or not key:
        raise InvalidCacheKeyError(f"store key must be a non-empty string, got {key!r}")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in key) or "\\" in key:
        raise InvalidCacheKeyError(f"store key {key!r} contains a control character or '\\'")
    if key.startswith("/"):
        raise InvalidCacheKeyError(f"store key {key!r} is absolute")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidCacheKeyError(f"store key {key!r} has an empty, '.' or '..' component")
    return key


def _range_spec(byte_range: ByteRequest) -> str | None:
    """Spell a byte request as a file-name-safe token; ``None`` if it is not cacheable."""
    if isinstance(byte_range, RangeByteRequest):
        if 0 <= byte_range.start <= byte_range.end:
            return f"r{byte_range.start}-{byte_range.end}"
    elif isinstance(byte_range, OffsetByteRequest):
        if byte_range.offset >= 0:
            return f"o{byte_range.offset}"
    elif isinstance(byte_range, SuffixByteRequest):
        if byte_range.suffix >= 0:
            return f"s{byte_range.suffix}"
    return None


def cache_key(namespace: str, key: str, byte_range: ByteRequest | None = None) -> str | None:
    """Return the cache key of ``key`` (or of one byte range of it) in ``namespace``.

    Returns ``None`` when the read cannot be cached and must go straight to the source: a
    key holding :data:`RANGE_SEPARATOR`, or a byte request the cache does not know (the
    source then raises its own error for it).

    Raises
    ------
    InvalidCacheKeyError
        If ``key`` could escape the cache directory (see :func:`validate_key`).

    """
    validate_key(key)
    if RANGE_SEPARATOR in key:
        return None
    if byte_range is None:
        return f"{namespace}/{key}"
    spec = _range_spec(byte_range)
    return None if spec is None else f"{namespace}/{key}{RANGE_SEPARATOR}{spec}"


def base_key(key: str) -> str:
    """Return the whole-object cache key of a cache key (strips a range spec)."""
    return key.partition(RANGE_SEPARATOR)[0]
