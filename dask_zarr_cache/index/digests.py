"""How the index names cache keys (64-bit digests), and which shard holds each.

The index is split over several actors by a stable hash of the key (the same in every
process, unlike Python's ``hash``).  All byte ranges of an object share the object's
shard.  Shards take their digit from the digest's high bits; the index's table uses the
low bits for slots, so the two never correlate.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, TypeVar

from dask_zarr_cache.identity.keys import base_key, is_immutable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["IMMUTABLE_BIT", "group_by_shard", "key_digest", "shard_of"]

T = TypeVar("T")


#: The digest bit that says the key's object never changes (its entry never expires).
IMMUTABLE_BIT = 1 << 63


def key_digest(key: str) -> int:
    """The 64-bit digest naming ``key`` in the index (never 0: 0 marks a free slot).

    The top bit is :data:`IMMUTABLE_BIT` exactly for keys of immutable data (a snapshot),
    so the index knows without the key.  Two keys with one digest (odds ~n**2 / 2**64:
    5e-6 at 10 million keys) would only send a reader to a peer that answers "missing";
    peers serve by full key.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    value = int.from_bytes(digest, "little") & (IMMUTABLE_BIT - 1)
    return (value | IMMUTABLE_BIT) if is_immutable(key) else (value or 1)


def shard_of(key: str, shards: int) -> int:
    """The shard (``0 <= shard < shards``) whose index holds ``key``."""
    if shards == 1:
        return 0
    return (key_digest(base_key(key)) >> 40) % shards


def group_by_shard(values: Iterable[T], shards: int, key: Callable[[T], str]) -> dict[int, list[T]]:
    """Split ``values`` by the shard of ``key(value)``, keeping their order in each group."""
    groups: dict[int, list[T]] = {}
    for value in values:
        groups.setdefault(shard_of(key(value), shards), []).append(value)
    return groups
