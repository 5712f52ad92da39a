r"""Cache keys: how the cache names an object, or a byte range of one.

A cache key is ``<namespace>\0<path>`` for a whole object and
``<namespace>\0<path>\0<range spec>`` for a byte range of it.  The namespace names the
storage system (filesystem protocol and endpoint, one in-memory store, one immutable
snapshot); the path is the object's full path in it.  Which namespace and path a store's
key has is :mod:`~dask_zarr_cache.identity.stores`'s job.  NUL cannot occur in a namespace or a
zarr key, which makes the composition unambiguous.

Keys never become file names directly (the disk layer hashes them), so no key can escape
the cache directory; :func:`validate_key` only refuses what is not a zarr key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from dask_zarr_cache.core.exceptions import CacheConfigError, InvalidCacheKeyError

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest

__all__ = [
    "IMMUTABLE",
    "SEPARATOR",
    "base_key",
    "is_immutable",
    "object_key",
    "validate_key",
    "validate_namespace",
]

#: Separates namespace, path and range spec in a cache key.
SEPARATOR = "\x00"
#: First character of the namespace of data that never changes (a snapshot): its
#: objects never expire, whatever ``max_age_seconds`` says.
IMMUTABLE = "\x01"


def validate_namespace(namespace: object) -> str:
    """Check a user-given namespace: any non-empty string without NUL.

    Raises
    ------
    CacheConfigError
        If ``namespace`` is not a string, is empty, holds a NUL character, or starts with
        :data:`IMMUTABLE` (reserved for snapshots).

    """
    if (
        not isinstance(namespace, str)
        or not namespace
        or SEPARATOR in namespace
        or namespace.startswith(IMMUTABLE)
    ):
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


def object_key(namespace: str, path: str, byte_range: ByteRequest | None = None) -> str | None:
    """The cache key of the object at ``path`` in ``namespace`` (or of a byte range of it).

    Returns ``None`` when the read cannot be cached and must go straight to the source: a
    byte request the cache does not know (the source then raises its own error for it).
    """
    base = f"{namespace}{SEPARATOR}{path}"
    if byte_range is None:
        return base
    spec = _range_spec(byte_range)
    return None if spec is None else f"{base}{SEPARATOR}{spec}"


def base_key(key: str) -> str:
    """Return the whole-object cache key of a cache key (strips a range spec)."""
    first = key.find(SEPARATOR)
    second = key.find(SEPARATOR, first + 1)
    return key if first < 0 or second < 0 else key[:second]


def is_immutable(key: str) -> bool:
    """Whether the object ``key`` names never changes (its namespace is a snapshot's)."""
    return key.startswith(IMMUTABLE)
