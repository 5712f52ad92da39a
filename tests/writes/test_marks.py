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


def test_a_write_knows_whether_another_one_of_its_key_came_since_it_started():
    marks = WriteMarks()
    marks.mark(2, ["ns\x00a"], [])  # before the write of seq 9 started (after=4)
    marks.mark(9, ["ns\x00a"], [])
    assert not marks.replaced_between("ns\x00a", 4, 9)
    marks.mark(6, ["ns\x00a"], [])  # another writer's, numbered while ours was under way
    assert marks.replaced_between("ns\x00a", 4, 9)
    assert marks.replaced_between("ns\x00b", 8, 9) is False
    marks.mark(10, ["ns\x00b"], [])  # a newer write
    assert marks.replaced_between("ns\x00b", 8, 9)
    marks.mark(7, [], ["ns\x00d/"])
    assert marks.replaced_between("ns\x00d/x", 4, 9)
    assert not marks.replaced_between("ns\x00d/x", 7, 9)


def test_an_own_write_numbered_keeps_the_two_newest_marks_in_order():
    marks = WriteMarks()
    marks.mark(5, ["ns\x00a"], [])
    marks.mark(UNSEQUENCED, ["ns\x00a"], [])
    marks.numbered(["ns\x00a"], [], 8)
    assert marks.needed("ns\x00a") == 8
    assert not marks.replaced_between("ns\x00a", 5, 8)
    assert marks.replaced_between("ns\x00a", 4, 8)


def test_a_forgotten_mark_counts_as_a_write_since():
    marks = WriteMarks(max_keys=1)
    marks.mark(3, ["ns\x00a"], [])
    marks.mark(4, ["ns\x00b"], [])  # "a" forgotten: floor 3
    assert marks.replaced_between("ns\x00a", 2, 3)
    assert not marks.replaced_between("ns\x00b", 3, 4)
