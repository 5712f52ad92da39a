"""The scheduler's write history: numbering, bounds, catch-up, and judging files by it."""

from __future__ import annotations

from dataclasses import dataclass

from dask_zarr_cache.writes.log import InvalidationLog, matcher, verify_files


@dataclass
class File:
    key: str
    epoch: bytes
    seq: int


def test_writes_are_numbered_and_replayed_after_a_position():
    log = InvalidationLog()
    first = log.append(["a"], [])
    second = log.append([], ["p/"])
    assert (first.seq, second.seq, log.seq) == (1, 2, 2)
    assert [e.seq for e in log.since(0)] == [1, 2]
    assert [e.seq for e in log.since(1)] == [2]
    assert log.since(2) == []


def test_a_bounded_log_tells_a_worker_too_far_behind_that_its_history_is_lost():
    log = InvalidationLog(max_keys=2)
    for key in "abc":
        log.append([key], [])
    assert log.floor == 1
    assert log.since(0) is None  # write 1 is forgotten: nothing provable
    assert [e.keys for e in log.since(1)] == [("b",), ("c",)]


def test_catch_up_for_each_kind_of_worker():
    log = InvalidationLog()
    log.append(["a"], [])
    log.append(["b"], ["p/"])
    # Behind in this history: the writes it missed; it has applied what it says.
    assert log.catch_up(log.epoch, 1) == ([(2, ["b"], ["p/"])], 1)
    # New, without files: nothing to drop, and it stands at the newest write.
    assert log.catch_up(None, 0) == ([], 2)
    # Files from another scheduler's history: drop them all, it has applied nothing here.
    assert log.catch_up(b"x" * 16, 5) == (None, 0)


def test_files_are_current_unless_a_later_write_touched_them_or_unknown_to_the_history():
    log = InvalidationLog()
    log.append(["a"], [])  # 1
    log.append([], ["dir/"])  # 2
    history = [e.as_message() for e in log.since(0)]
    files = [
        File("a", log.epoch, 0),  # read before write 1 of its key
        File("a", log.epoch, 1),  # read after it
        File("dir/x", log.epoch, 1),  # under a prefix written later
        File("b", log.epoch, 0),  # never written
        File("b", b"y" * 16, 5),  # another history
    ]
    good, unknown, stale = verify_files(files, log.epoch, history)
    assert [(f.key, f.seq) for f in good] == [("a", 1), ("b", 0)]
    assert stale == ["a", "dir/x"]
    assert unknown == [files[4]]  # only the source can tell
    assert verify_files(files[:1], log.epoch, None) == ([], files[:1], [])  # history lost


def test_matcher_takes_whole_keys_and_prefixes():
    matches = matcher(["k"], ["p/"])
    assert matches("k") and matches("p/x")
    assert not matches("kk") and not matches("p")
