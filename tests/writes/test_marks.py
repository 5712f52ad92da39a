"""What a worker remembers of the writes it applied, by key (for judging peers' bytes)."""

from __future__ import annotations

from dask_zarr_cache.writes.marks import UNSEQUENCED, WriteMarks


def test_the_newest_write_of_a_key_or_a_prefix_above_it_is_needed():
    marks = WriteMarks()
    marks.mark(3, ["ns\x00a"], [])
    marks.mark(5, [], ["ns\x00d/"])
    marks.mark(4, ["ns\x00a"], [])
    assert marks.needed("ns\x00a") == 4
    assert marks.needed("ns\x00a\x00bytes=0-9") == 4  # a byte range of that object
    assert marks.needed("ns\x00d/x") == 5
    assert marks.needed("ns\x00b") == 0


def test_an_own_write_counts_as_newest_until_it_has_its_number():
    marks = WriteMarks()
    marks.mark(UNSEQUENCED, ["ns\x00a"], [])
    assert marks.needed("ns\x00a") == UNSEQUENCED  # no peer can be known to have it yet
    marks.numbered(["ns\x00a"], [], 7)
    assert marks.needed("ns\x00a") == 7


def test_forgotten_marks_leave_a_floor_for_every_key():
    marks = WriteMarks(max_keys=2)
    for seq, key in enumerate(["a", "b", "c"], start=1):
        marks.mark(seq, [f"ns\x00{key}"], [])
    assert marks.floor == 1  # "a" was forgotten: its write stands for every key
    assert marks.needed("ns\x00a") == 1
    assert marks.needed("ns\x00never") == 1
    assert marks.needed("ns\x00c") == 3
