"""The index's digest table against a dict, through growth, removal and wrap-around."""

from __future__ import annotations

import random

import numpy as np

from dask_zarr_cache.index.table import MAX_LOAD, DigestTable


def check(table: DigestTable, model: dict[int, tuple[int, int, float]]) -> None:
    assert len(table) == len(model)
    for digest, row in model.items():
        slot = table.find(digest)
        assert slot >= 0 and table.row(slot) == row
    occupied = table.digests[table.digests != 0]
    assert sorted(occupied.tolist()) == sorted(model)


def test_random_operations_match_a_dict():
    rng = random.Random(1)
    table, model = DigestTable(), {}
    # Few home bits in play: long probe runs that wrap around the end of the table.
    digests = [rng.getrandbits(64) | 1 for _ in range(3000)] + [
        (table.size - 1 - i) | (i << 32) for i in range(1, 40)
    ]
    for step in range(20_000):
        digest = rng.choice(digests)
        if rng.random() < 0.6:
            row = (rng.randrange(1, 500), rng.getrandbits(32), float(rng.randrange(1000)))
            table.put(digest, *row)
            model[digest] = row
        else:
            slot = table.find(digest)
            assert (slot >= 0) == (digest in model)
            if slot >= 0:
                table.remove(slot)
                del model[digest]
        if step % 2000 == 0:
            check(table, model)
    check(table, model)
    assert table.size > 1024 and len(table) <= MAX_LOAD * table.size
    assert table.find(12345678 << 1) == -1


def test_bulk_drop_keeps_every_other_row_findable():
    rng = random.Random(2)
    table, model = DigestTable(), {}
    for _ in range(50_000):
        digest = rng.getrandbits(64) | 1
        row = (rng.randrange(1, 5), 7, 1.5)
        table.put(digest, *row)
        model[digest] = row
    assert table.drop(table.owners == 3) == sum(1 for r in model.values() if r[0] == 3)
    check(table, {d: r for d, r in model.items() if r[0] != 3})
    assert table.slots_where(table.owners == 3).size == 0
    assert table.slots_where(np.ones(table.size, bool)).size == len(table)


def test_bytes_per_row_stay_small():
    table = DigestTable()
    rng = random.Random(3)
    for _ in range(100_000):
        table.put(rng.getrandbits(64) | 1, 1, 1, 0.0)
    assert table.nbytes / len(table) <= 18 / (MAX_LOAD / 2)


def test_removal_across_the_end_of_the_table():
    table = DigestTable()
    end = table.size - 1
    a, b, c = end | (1 << 40), end | (2 << 40), (end - 1) | (3 << 40)
    for digest in (c, a, b):  # c at end-1, a at end, b wraps to slot 0
        table.put(digest, 1, 1, 0.0)
    assert table.find(b) == 0
    table.remove(table.find(a))
    assert table.find(b) == end and table.find(c) == end - 1  # b moved back over the end
    table.remove(table.find(c))
    assert table.find(b) == end and len(table) == 1
