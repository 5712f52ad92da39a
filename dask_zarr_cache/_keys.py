r"""Cache identity: where an object lives, and the cache key that names it.

A cache key is ``<namespace>\0<path>`` for a whole object and
``<namespace>\0<path>\0<range spec>`` for a byte range of it.  The namespace names the
storage system (filesystem protocol and endpoint, or one in-memory store); the path is
the object's full path in it (store root + zarr key).  So every store object opened on the
same data, whatever its credentials, ``read_only`` flag, trailing slash or root, names an
object by the same key, and two different sources never do.  NUL cannot occur in a
namespace or a zarr key, which makes the composition unambiguous.

Keys never become file names directly (the disk layer hashes them), so no key can escape
the cache directory; :func:`validate_key` only refuses what is not a zarr key.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, LoggingStore, MemoryStore, WrapperStore, ZipStore

from dask_zarr_cache._exceptions import CacheConfigError, InvalidCacheKeyError

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store

__all__ = [
    "SEPARATOR",
    "SourceLocation",
    "base_key",
    "cache_key",
    "cache_prefix",
    "source_location",
    "validate_key",
    "validate_namespace",
]

#: Separates namespace, path and range spec in a cache key.
SEPARATOR = "\x00"

#: Attribute holding the identity token of an in-memory store (never reused, unlike ``id``).
_TOKEN_ATTRIBUTE = "_dask_zarr_cache_token"
#: Storage options that say who reads, not where the data is: left out of the identity.
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "profile", "anon")
#: Protocol aliases that name the same storage.
_PROTOCOL_ALIASES = {"s3a": "s3", "gs": "gcs", "local": "file", "abfs": "az", "adl": "az"}


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """Where a source store's objects live.

    Attributes
    ----------
    namespace : str
        The storage system (see module docstring), or a user-given namespace.
    root : str
        Path of the store's root in that system, without leading or trailing ``/``.

    """

    namespace: str
    root: str = ""

    def path_of(self, key: str) -> str:
        """The full path of zarr key ``key``."""
        return f"{self.root}/{key}" if self.root and key else self.root or key


def validate_namespace(namespace: object) -> str:
    """Check a user-given namespace: any non-empty string without NUL.

    Raises
    ------
    CacheConfigError
        If ``namespace`` is not a string, is empty or holds a NUL character.

    """
    if not isinstance(namespace, str) or not namespace or SEPARATOR in namespace:
        raise CacheConfigError(
            f"namespace must be a non-empty string without NUL characters, got {namespace!r}"
        )
    return namespace


def validate_key(key: object) -> str:
    """Check that ``key`` is a zarr key: ``/``-separated names, none empty, ``.`` or ``..``.

    Any other character is fine (unicode, spaces, tabs, backslashes, ``#``, long names).

    Raises
    ------
    InvalidCacheKeyError
        If the key is not a string, is absolute, holds NUL, or has an empty, ``.`` or
        ``..`` component (such keys name other objects on some stores, e.g.
        ``LocalStore`` would leave its root).

    """
    if not isinstance(key, str):
        raise InvalidCacheKeyError(f"store key must be a string, got {key!r}")
    if SEPARATOR in key:
        raise InvalidCacheKeyError(f"store key {key!r} contains a NUL character")
    if key.startswith("/"):
        raise InvalidCacheKeyError(f"store key {key!r} is absolute")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidCacheKeyError(f"store key {key!r} has an empty, '.' or '..' component")
    return key


def _range_spec(byte_range: ByteRequest) -> str | None:
    """Spell a byte request as a token; ``None`` if it is not cacheable."""
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


def cache_key(
    location: SourceLocation, key: str, byte_range: ByteRequest | None = None
) -> str | None:
    """Return the cache key of ``key`` (or of one byte range of it) at ``location``.

    Returns ``None`` when the read cannot be cached and must go straight to the source: a
    byte request the cache does not know (the source then raises its own error for it).

    Raises
    ------
    InvalidCacheKeyError
        If ``key`` is not a zarr key (see :func:`validate_key`).

    """
    validate_key(key)
    base = f"{location.namespace}{SEPARATOR}{location.path_of(key)}"
    if byte_range is None:
        return base
    spec = _range_spec(byte_range)
    return None if spec is None else f"{base}{SEPARATOR}{spec}"


def cache_prefix(location: SourceLocation, prefix: str) -> str:
    """The cache-key prefix of every object below zarr key prefix ``prefix`` (``""``: all)."""
    path = location.path_of(prefix.strip("/"))
    return f"{location.namespace}{SEPARATOR}{path}/" if path else location.namespace + SEPARATOR


def base_key(key: str) -> str:
    """Return the whole-object cache key of a cache key (strips a range spec)."""
    first = key.find(SEPARATOR)
    second = key.find(SEPARATOR, first + 1)
    return key if first < 0 or second < 0 else key[:second]


# -- identity of a source store -------------------------------------------------------------
def source_location(store: Store) -> SourceLocation:
    """Return where ``store``'s objects live.

    Raises
    ------
    CacheConfigError
        If the store's location cannot be known; pass ``namespace=`` to the
        :class:`~dask_zarr_cache.ClusterCacheStore` then.

    """
    if isinstance(store, LoggingStore) or type(store).__name__ == "LatencyStore":
        return source_location(store._store)  # pass-through wrappers (zarr's own)
    if isinstance(store, WrapperStore):
        inner = source_location(store._store)  # a wrapper may change bytes: its own space
        kind = f"{type(store).__module__}.{type(store).__qualname__}"
        return SourceLocation(_token(["wrapper", kind, inner.namespace]), inner.root)
    if isinstance(store, FsspecStore):
        return _fsspec_location(store)
    if isinstance(store, LocalStore):
        return SourceLocation(_token(["file"]), _clean(os.path.realpath(store.root)))
    if isinstance(store, ZipStore):
        return SourceLocation(_token(["zip"]), _clean(os.path.realpath(store.path)))
    if isinstance(store, MemoryStore):
        return SourceLocation(_memory_token(store))
    raise CacheConfigError(
        f"cannot tell where the objects of {type(store).__name__} live, so the cache cannot "
        "name them safely; pass namespace='<a name unique to this data>' to ClusterCacheStore"
    )


def _fsspec_location(store: FsspecStore) -> SourceLocation:
    fs = getattr(store.fs, "sync_fs", store.fs)  # zarr wraps sync filesystems
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    path = store.path
    if protocol == "file":
        return SourceLocation(_token(["file"]), _clean(os.path.realpath(path)))
    if protocol == "memory":  # fsspec's memory filesystem is per process
        return SourceLocation(_memory_token(fs), _clean(path))
    if protocol == "s3":
        endpoint = _s3_endpoint(fs)
        return SourceLocation(_token(["s3", endpoint]), _clean(path))
    if protocol in ("http", "https"):  # the path is the whole URL
        return SourceLocation(_token(["http"]), _clean(path.split("://", 1)[-1]))
    return SourceLocation(_token([protocol, _location_options(fs)]), _clean(path))


def _s3_endpoint(fs: Any) -> str:
    """The S3 endpoint (``"aws"`` for AWS itself), normalized."""
    options = getattr(fs, "storage_options", {}) or {}
    client_kwargs = getattr(fs, "client_kwargs", None) or options.get("client_kwargs") or {}
    endpoint = (
        getattr(fs, "endpoint_url", None)
        or options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
    )
    return str(endpoint).rstrip("/").lower() if endpoint else "aws"


def _location_options(fs: Any) -> dict[str, object]:
    """Storage options of an unknown filesystem, without credentials."""
    options = getattr(fs, "storage_options", {}) or {}
    return {
        k: v
        for k, v in options.items()
        if not any(word in k.lower() for word in _CREDENTIAL_WORDS)
        and k not in ("skip_instance_cache", "asynchronous", "loop", "use_listings_cache")
    }


def _memory_token(obj: object) -> str:
    """An identity for in-memory data: made once per object, never reused."""
    token = getattr(obj, _TOKEN_ATTRIBUTE, None)
    if token is None:
        token = f"memory-{uuid.uuid4().hex}"
        setattr(obj, _TOKEN_ATTRIBUTE, token)
    return token


def _token(identity: list[object]) -> str:
    text = json.dumps(identity, sort_keys=True, default=repr)
    return "ns-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _clean(path: str) -> str:
    return path.strip("/")
