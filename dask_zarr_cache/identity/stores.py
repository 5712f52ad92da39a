"""Where a source store's bytes live: one identity per object, whatever the store's class.

The cache names an object by where its bytes live, so every store opened on the same
objects shares entries and invalidations (whatever its class, credentials, ``read_only``
flag, trailing slash or root) and two different objects never share one:

- **object stores** (:class:`SourceLocation`): the storage system (S3 and its endpoint,
  GCS, Azure and its account, HTTP, local files by real path) plus the object's full
  path.  zarr's ``FsspecStore`` and ``ObjectStore`` (obstore) over the same bucket and
  path name an object the same way; credentials and client options never count.
- **in-memory stores**: one identity per dict (or obstore ``MemoryStore``) holding the
  bytes, shared by every store over it, never reused even when Python reuses the id.
- **snapshots**: an Icechunk read-only session is its snapshot id, which never changes
  (:data:`~dask_zarr_cache.identity.keys.IMMUTABLE`: its objects never expire); a writable
  session reads through (:class:`ReadThrough`), so it never fills a snapshot's entries.
- **references** (:class:`ReferenceTargets`): a chunk of a VirtualiZarr ``ManifestStore``
  or a kerchunk reference set is the byte range of the file it points to, named as that
  file's own store would name it; metadata and inlined chunks live in memory and are
  read through.

Stores of unknown identity need a user-given namespace (``ClusterCacheStore(...,
namespace=...)``): a promise that the data does not change under it except through the
cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import (
    FsspecStore,
    LocalStore,
    LoggingStore,
    MemoryStore,
    ObjectStore,
    WrapperStore,
    ZipStore,
)

from dask_zarr_cache.core.exceptions import CacheConfigError
from dask_zarr_cache.identity.keys import IMMUTABLE, SEPARATOR, object_key, validate_key

if TYPE_CHECKING:
    from collections.abc import Callable

    from zarr.abc.store import ByteRequest, Store

__all__ = [
    "ReadThrough",
    "ReferenceTargets",
    "SourceIdentity",
    "SourceLocation",
    "declared_immutable",
    "source_identity",
]

#: Storage options that say who reads, not where the data is: left out of the identity.
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "profile", "anon")
#: Protocol aliases that name the same storage.
_PROTOCOL_ALIASES = {
    "s3a": "s3",
    "gs": "gcs",
    "local": "file",
    "abfs": "az",
    "abfss": "az",
    "adl": "az",
}
#: Icechunk's first snapshot: the same id in every repository (and empty).
_ICECHUNK_INITIAL_SNAPSHOT = "1CECHNKREP0F1RSTCMT0"


class SourceIdentity:
    """How the cache names the objects of one source store (a value; pickles small)."""

    if TYPE_CHECKING:  # a field of some identities, a property of others

        @property
        def namespace(self) -> str:
            """What the source is called in messages and statistics."""

    def read_key(
        self, source: Store, key: str, byte_range: ByteRequest | None = None
    ) -> str | None:
        """The cache key of a read of ``key`` from ``source``; ``None``: read through.

        Raises
        ------
        InvalidCacheKeyError
            If ``key`` is not a zarr key.

        """
        raise NotImplementedError

    def written(self, keys: list[str], prefixes: list[str]) -> tuple[list[str], list[str]]:
        """The cache keys and key prefixes a write of ``keys`` and ``prefixes`` replaces.

        Raises
        ------
        InvalidCacheKeyError
            If a key is not a zarr key.

        """
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class SourceLocation(SourceIdentity):
    """Objects at a place: a storage system and the path of the store's root in it.

    Attributes
    ----------
    namespace : str
        The storage system (a token of protocol and endpoint, or one in-memory store),
        or a user-given namespace.
    root : str
        Path of the store's root in that system, without leading or trailing ``/``.

    """

    namespace: str
    root: str = ""

    def path_of(self, key: str) -> str:
        """The full path of zarr key ``key``."""
        return f"{self.root}/{key}" if self.root and key else self.root or key

    def read_key(
        self, source: Store, key: str, byte_range: ByteRequest | None = None
    ) -> str | None:
        """See :meth:`SourceIdentity.read_key`."""
        return object_key(self.namespace, self.path_of(validate_key(key)), byte_range)

    def written(self, keys: list[str], prefixes: list[str]) -> tuple[list[str], list[str]]:
        """See :meth:`SourceIdentity.written` (``delete("")`` drops everything)."""
        whole = [object_key(self.namespace, self.path_of(validate_key(k))) for k in keys if k]
        below = [self.prefix(p) for p in prefixes] + ([self.prefix("")] if "" in keys else [])
        return [k for k in whole if k is not None], below

    def prefix(self, prefix: str) -> str:
        """The cache-key prefix of every object below zarr key prefix ``prefix``."""
        path = self.path_of(prefix.strip("/"))
        return f"{self.namespace}{SEPARATOR}{path}/" if path else self.namespace + SEPARATOR


@dataclass(frozen=True, slots=True)
class ReadThrough(SourceIdentity):
    """A source the cache does not name: every read goes to it, no write needs telling."""

    why: str

    @property
    def namespace(self) -> str:
        """``"read-through"``."""
        return "read-through"

    def read_key(
        self, source: Store, key: str, byte_range: ByteRequest | None = None
    ) -> str | None:
        """``None``: read through (after checking the key)."""
        validate_key(key)
        return None

    def written(self, keys: list[str], prefixes: list[str]) -> tuple[list[str], list[str]]:
        """Nothing to drop: nothing of this source was cached."""
        for key in keys:
            if key:
                validate_key(key)
        return [], []


@dataclass(frozen=True, slots=True)
class ReferenceTargets(SourceIdentity):
    """A reference store: each chunk is named by the file and byte range it points to.

    Two virtual datasets over the same files share entries, different files never do,
    and a write to a referenced file (through any store on it) drops those entries.
    Writes through the reference store change references, not files: nothing to drop.
    """

    kind: str  #: ``"manifest"`` (VirtualiZarr) or ``"kerchunk"`` (fsspec references)

    @property
    def namespace(self) -> str:
        """``"references"``: each chunk has the namespace of the file it points to."""
        return f"{self.kind}-references"

    def read_key(
        self, source: Store, key: str, byte_range: ByteRequest | None = None
    ) -> str | None:
        """The key of the referenced range; ``None`` for metadata and inlined chunks."""
        validate_key(key)
        resolve: Callable[[Any, str], Target | None] = (
            _manifest_target if self.kind == "manifest" else _reference_target
        )
        try:
            target = resolve(source, key)
        except Exception as err:  # private APIs of the reference libraries changed
            _warn_once(f"cannot resolve {self.kind} references ({err!r}); reading through")
            return None
        if target is None:
            return None
        location, path, offset, length = target
        if offset is None:  # a whole file
            return object_key(location, path, byte_range)
        inner = _within(offset, length, byte_range)
        return None if inner is None else object_key(location, path, inner)

    def written(self, keys: list[str], prefixes: list[str]) -> tuple[list[str], list[str]]:
        """Nothing to drop (see the class docstring)."""
        for key in keys:
            if key:
                validate_key(key)
        return [], []


def declared_immutable(identity: SourceIdentity) -> SourceIdentity:
    """The identity of a source its user declares never changes (``immutable=True``).

    Its objects go to an immutable namespace of their own: no TTL, and files of an
    earlier cluster kept without a check, as for an Icechunk snapshot.

    Raises
    ------
    CacheConfigError
        If the cache does not name the store's objects by location (it reads through, or
        names references by what they point to).

    """
    if not isinstance(identity, SourceLocation):
        raise CacheConfigError(
            f"immutable=True applies to stores whose objects the cache names by location; "
            f"this one is named {identity.namespace!r}"
        )
    if identity.namespace.startswith(IMMUTABLE):
        return identity
    return SourceLocation(IMMUTABLE + identity.namespace, identity.root)


def source_identity(store: Store, namespace: str | None = None) -> SourceIdentity:
    """Return how the cache names the objects of ``store``.

    ``namespace``, if given, names them instead (see the module docstring).

    Raises
    ------
    CacheConfigError
        If the store's location cannot be known (pass ``namespace=``), or a namespace is
        given for a store that names its own versions (Icechunk).

    """
    kind = _kind(store)
    if namespace is not None:
        if kind == "icechunk":
            raise CacheConfigError(
                "an Icechunk store is named by its snapshot, which the cache reads itself; "
                "namespace= would give every snapshot the same name and serve one "
                "snapshot's bytes for another's"
            )
        return SourceLocation(namespace)
    if isinstance(store, LoggingStore) or type(store).__name__ == "LatencyStore":
        wrapped: Store = getattr(store, "_store")  # noqa: B009 (pass-through wrappers: zarr's own)
        return source_identity(wrapped)
    if isinstance(store, WrapperStore):
        inner = source_identity(store._store)  # a wrapper may change bytes: its own space
        if not isinstance(inner, SourceLocation):
            return ReadThrough(f"{type(store).__name__} over {inner.namespace}")
        return SourceLocation(_token(["wrapper", _qualname(store), inner.namespace]), inner.root)
    if isinstance(store, FsspecStore):
        if _is_reference_filesystem(_fsspec_fs(store)):
            return ReferenceTargets("kerchunk")
        return _fsspec_location(_fsspec_fs(store), store.path)
    if isinstance(store, LocalStore):
        return SourceLocation(_token(["file"]), _clean(os.path.realpath(store.root)))
    if isinstance(store, ZipStore):
        if store.path is None:  # over an open file object (zarr >= 3.4): nothing names it
            return ReadThrough("a zip store over an open file")
        return SourceLocation(_token(["zip"]), _clean(os.path.realpath(store.path)))
    if isinstance(store, MemoryStore):
        data = store._store_dict
        token = _IN_MEMORY.token(store, data, lambda s: s._store_dict)
        return SourceLocation(token, _clean(getattr(store, "path", "") or ""))
    if isinstance(store, ObjectStore):
        return _obstore_location(store.store, holder=store)
    if kind == "icechunk":
        return _icechunk_identity(store)
    if kind == "manifest":
        return ReferenceTargets("manifest")
    raise CacheConfigError(
        f"cannot tell where the objects of {type(store).__name__} live, so the cache cannot "
        "name them safely; pass namespace='<a name for this data>' to ClusterCacheStore. "
        "The namespace promises that the data does not change under that name except "
        "through the cache: give versioned data a new namespace per version"
    )


# -- fsspec -------------------------------------------------------------------------------
def _fsspec_fs(store: FsspecStore) -> Any:
    return getattr(store.fs, "sync_fs", store.fs)  # zarr wraps sync filesystems


def _is_reference_filesystem(fs: Any) -> bool:
    from fsspec.implementations.reference import ReferenceFileSystem

    return isinstance(fs, ReferenceFileSystem)


def _fsspec_location(fs: Any, path: str) -> SourceLocation:
    """Where ``path`` of fsspec filesystem ``fs`` lives."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    options = getattr(fs, "storage_options", {}) or {}
    if protocol == "file":
        return SourceLocation(_token(["file"]), _clean(os.path.realpath(path)))
    if protocol == "memory":  # fsspec's memory filesystem is per process
        return SourceLocation(_IN_MEMORY.token(fs, fs.store, lambda f: f.store), _clean(path))
    if protocol == "s3":
        return SourceLocation(_s3_system(_s3_endpoint(fs)), _clean(path))
    if protocol == "gcs":
        endpoint = getattr(fs, "_endpoint", None) or options.get("endpoint_url")
        return SourceLocation(_gcs_system(endpoint), _clean(path))
    if protocol == "az":
        account = getattr(fs, "account_name", None) or options.get("account_name")
        return SourceLocation(_azure_system(account), _clean(path))
    if protocol in ("http", "https"):  # the path is the whole URL
        return SourceLocation(_token(["http"]), _clean(path.split("://", 1)[-1]))
    return SourceLocation(_token([protocol, _location_options(options)]), _clean(path))


def _s3_endpoint(fs: Any) -> str | None:
    options = getattr(fs, "storage_options", {}) or {}
    client_kwargs = getattr(fs, "client_kwargs", None) or options.get("client_kwargs") or {}
    return (
        getattr(fs, "endpoint_url", None)
        or options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
    )


def _location_options(options: dict[str, object]) -> dict[str, object]:
    """Storage options of an unknown filesystem, without credentials."""
    return {
        k: v
        for k, v in options.items()
        if not any(word in k.lower() for word in _CREDENTIAL_WORDS)
        and k not in ("skip_instance_cache", "asynchronous", "loop", "use_listings_cache")
    }


# -- storage systems --------------------------------------------------------------------------
def _s3_system(endpoint: str | None) -> str:
    """S3 at ``endpoint``; every AWS endpoint (and none) is ``"aws"``."""
    host = urlsplit(endpoint).hostname if endpoint else None
    if not endpoint or (host or "").endswith("amazonaws.com"):
        return _token(["s3", "aws"])
    return _token(["s3", str(endpoint).rstrip("/").lower()])


def _gcs_system(endpoint: str | None) -> str:
    return _token(["gcs", str(endpoint).rstrip("/").lower() if endpoint else "google"])


def _azure_system(account: str | None) -> str:
    return _token(["az", str(account or "").lower()])


# -- obstore ----------------------------------------------------------------------------------
def _obstore_system(store: Any) -> tuple[str, str]:
    """The storage system of an obstore store, and the path of its root there."""
    kind = type(store).__name__
    prefix = _clean(str(getattr(store, "prefix", None) or ""))
    if kind == "S3Store":
        config = store.config
        endpoint = (
            config.get("endpoint")
            or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT")
        )
        return _s3_system(endpoint), _join(config.get("bucket", ""), prefix)
    if kind == "GCSStore":
        config = store.config
        return _gcs_system(config.get("base_url")), _join(config.get("bucket", ""), prefix)
    if kind == "AzureStore":
        config = store.config
        return _azure_system(config.get("account_name")), _join(
            config.get("container_name", ""), prefix
        )
    if kind == "HTTPStore":
        return _token(["http"]), _clean(store.url.split("://", 1)[-1])
    if kind == "LocalStore":
        return _token(["file"]), _clean(os.path.realpath(str(getattr(store, "prefix", "."))))
    raise CacheConfigError(f"cannot tell where the objects of obstore's {kind} live")


def _obstore_location(store: Any, holder: Any) -> SourceLocation:
    if type(store).__name__ == "MemoryStore":  # ``holder``: the zarr store over it
        return SourceLocation(_IN_MEMORY.token(holder, store, lambda h: h.store))
    system, root = _obstore_system(store)
    return SourceLocation(system, root)


# -- Icechunk ---------------------------------------------------------------------------------
def _icechunk_identity(store: Any) -> SourceIdentity:
    session = store.session
    if not session.read_only:
        return ReadThrough("a writable Icechunk session (its changes are its own)")
    snapshot = str(session.snapshot_id)
    if snapshot == _ICECHUNK_INITIAL_SNAPSHOT:  # the same id in every repository
        return ReadThrough("Icechunk's initial snapshot")
    return SourceLocation(IMMUTABLE + _token(["icechunk", snapshot]))


# -- references -------------------------------------------------------------------------------
Target = tuple[str, str, int | None, int | None]  #: namespace, full path, offset, length


def _manifest_target(store: Any, key: str) -> Target | None:
    """Where a VirtualiZarr ``ManifestStore`` chunk lives (``None``: metadata, inlined)."""
    from virtualizarr.manifests import ManifestArray
    from virtualizarr.manifests.store import _get_deepest_group_or_array
    from virtualizarr.manifests.utils import parse_manifest_index

    node, suffix = _get_deepest_group_or_array(store._group, key)
    if not isinstance(node, ManifestArray) or suffix.endswith(
        ("zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata")
    ):
        return None  # metadata: made in memory from the manifest
    separator = getattr(node.metadata.chunk_key_encoding, "separator", ".")
    index = parse_manifest_index(key, cast("Literal['.', '/']", separator), expand_pattern=True)
    if index in getattr(node.manifest, "_inlined", ()):  # bytes in the manifest itself
        return None
    entry = node.manifest.get_entry(index)
    if entry is None or not entry["path"]:
        return None
    url = entry["path"]
    holder, _ = store._registry.resolve(url)
    system, _root = _obstore_system(holder)
    return system, _url_path(url), int(entry["offset"]), int(entry["length"])


def _reference_target(store: FsspecStore, key: str) -> Target | None:
    """Where a kerchunk reference points (``None``: an inlined value)."""
    fs = _fsspec_fs(store)
    path = f"{store.path.strip('/')}/{key}" if store.path.strip("/") else key
    try:
        ref = fs.references[path]
    except KeyError:
        return None
    if not isinstance(ref, (list, tuple)) or not ref:
        return None  # text or bytes held in the references themselves
    url = ref[0] or fs.target
    protocol = url.split("://", 1)[0] if "://" in url else None
    target_fs = fs.fss.get(protocol) or fs.fss.get(None)
    if target_fs is None:
        return None
    location = _fsspec_location(target_fs, target_fs._strip_protocol(url))
    if len(ref) >= 3:
        return location.namespace, location.root, int(ref[1]), int(ref[2])
    return location.namespace, location.root, None, None


def _within(offset: int, length: int | None, byte_range: ByteRequest | None) -> Any:
    """A byte request of a referenced chunk as a range of its file; ``None``: not cacheable."""
    end = offset + (length or 0)
    if byte_range is None:
        return RangeByteRequest(offset, end)
    if isinstance(byte_range, RangeByteRequest):
        if 0 <= byte_range.start <= byte_range.end <= end - offset:
            return RangeByteRequest(offset + byte_range.start, offset + byte_range.end)
    elif isinstance(byte_range, OffsetByteRequest):
        if 0 <= byte_range.offset <= end - offset:
            return RangeByteRequest(offset + byte_range.offset, end)
    elif isinstance(byte_range, SuffixByteRequest):
        if 0 <= byte_range.suffix <= end - offset:
            return RangeByteRequest(end - byte_range.suffix, end)
    return None


def _url_path(url: str) -> str:
    """The full path of the object at ``url`` in its storage system."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file", "local"):
        return _clean(os.path.realpath(parts.path))
    return _clean(f"{parts.netloc.split('@')[0]}/{parts.path.lstrip('/')}")


# -- in-memory data ----------------------------------------------------------------------------
class _InMemoryIdentities:
    """One identity per in-memory object holding bytes, shared by the stores over it.

    Keyed by the object's ``id`` for lookup, but an identity is handed on only while a
    store over that very object is alive: Python reuses the ids of freed objects, and
    identities are never reused.
    """

    _ATTRIBUTE = "_dask_zarr_cache_token"

    def __init__(self) -> None:
        # Weak references in lists: stores define __eq__ without __hash__ (no WeakSet).
        self._holders: dict[int, list[weakref.ref[Any]]] = {}
        self._lock = threading.Lock()

    def token(self, holder: Any, data: object, data_of: Callable[[Any], object]) -> str:
        """The identity of ``data``, which store ``holder`` reads (``data_of(holder)``)."""
        token = getattr(holder, self._ATTRIBUTE, None)
        if token is not None:
            return token
        with self._lock:
            alive = [h for ref in self._holders.get(id(data), ()) if (h := ref()) is not None]
            same = [h for h in alive if data_of(h) is data]  # not a freed object's id reused
            token = getattr(same[0], self._ATTRIBUTE) if same else f"memory-{uuid.uuid4().hex}"
            self._holders[id(data)] = [weakref.ref(h) for h in (*same, holder)]
            setattr(holder, self._ATTRIBUTE, token)
            if len(self._holders) > 1024:  # forget objects no store reads any more
                self._holders = {
                    i: refs
                    for i, refs in self._holders.items()
                    if any(r() is not None for r in refs)
                }
        return token


_IN_MEMORY = _InMemoryIdentities()


# -- helpers ------------------------------------------------------------------------------------
def _kind(store: Store) -> str | None:
    module, name = type(store).__module__, type(store).__name__
    if module.startswith("icechunk") and name == "IcechunkStore":
        return "icechunk"
    if module.startswith("virtualizarr") and name == "ManifestStore":
        return "manifest"
    return None


def _qualname(store: Store) -> str:
    return f"{type(store).__module__}.{type(store).__qualname__}"


def _token(identity: list[object]) -> str:
    text = json.dumps(identity, sort_keys=True, default=repr)
    return "ns-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _clean(path: str) -> str:
    return path.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p for p in (_clean(p) for p in parts) if p)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
