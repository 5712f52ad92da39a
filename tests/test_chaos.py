"""The chaos suite: its checker on synthetic histories (fast), and one real run (slow)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from benchmarks import _chaos_tasks
from benchmarks._chaos_delays import ChaosDelays, read_delay_logs, unwrap_handlers, wrap_handlers
from benchmarks._chaos_history import (
    History,
    NemesisEvent,
    ReadOp,
    WriteOp,
    check,
    decode,
    encode,
    is_worker_death,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_BOUND, WRITE_BOUND = 8.0, 20.0


def initial(chunks: int = 2) -> list[WriteOp]:
    return [WriteOp(c, 1, 0.0, 0.0, "initial", None, "ok") for c in range(chunks)]


def write(chunk, version, t_invoke, t_return, outcome="ok", worker="w0", error=None):
    return WriteOp(chunk, version, t_invoke, t_return, "task", worker, outcome, error)


def read(chunk, version, t_invoke, t_return, worker="w1", torn=False, error=None, value=None):
    if value is None and version is not None:
        value = encode(chunk, version)
    return ReadOp(chunk, value, torn, t_invoke, t_return, worker, error)


def run(reads=(), writes=(), events=(), final_gets=None):
    history = History(list(reads), initial() + list(writes), list(events), final_gets)
    return check(history, READ_BOUND, WRITE_BOUND)


def test_encoding_round_trips():
    assert decode(encode(7, 12)) == (7, 12)
    assert encode(3, 1) == 10_003
    with pytest.raises(ValueError):
        encode(10_000, 1)


def test_a_clean_history_has_no_failures():
    report = run(
        reads=[read(0, 1, 1.0, 1.1), read(0, 2, 3.0, 3.1), read(1, 1, 3.0, 3.2)],
        writes=[write(0, 2, 2.0, 2.5)],
    )
    assert report.ok, report.failures
    assert report.stats["reads"] == 3 and report.stats["writes"] == 1


def test_a_read_after_a_write_returned_seeing_the_old_version_is_stale():
    report = run(reads=[read(0, 1, 2.6, 2.7)], writes=[write(0, 2, 2.0, 2.5)])
    assert report.failures["stale_reads"] == 1
    example = report.examples["stale_reads"][0]
    assert example["saw"] == 1 and example["expected_at_least"] == 2
    assert example["started_after"] == pytest.approx(0.1)


def test_reads_overlapping_a_write_may_see_either_version():
    report = run(
        reads=[read(0, 1, 2.1, 2.6), read(0, 2, 2.2, 2.3), read(0, 1, 2.4, 2.45)],
        writes=[write(0, 2, 2.0, 2.5)],
    )
    assert report.failures["stale_reads"] == 0


def test_failed_and_maybe_writes_may_be_seen_and_never_force_a_version():
    writes = [
        write(0, 2, 1.0, 1.5, outcome="maybe", error="KilledWorker: lost"),
        write(0, 3, 2.0, 2.5, outcome="failed", error="OSError: disk"),
    ]
    report = run(
        reads=[read(0, 2, 3.0, 3.1), read(0, 1, 3.0, 3.1), read(0, 3, 4, 4.1)], writes=writes
    )
    assert report.failures["stale_reads"] == 0
    assert report.failures["never_written"] == 0
    assert report.failures["cache_errors"] == 1  # the OSError; KilledWorker is Dask's outcome


def test_a_maybe_written_version_after_the_last_ok_one_passes_the_final_reads():
    writes = [write(0, 2, 1.0, 1.5), write(0, 3, 2.0, 2.5, outcome="maybe", error=None)]
    final = [ReadOp(0, encode(0, v), False, 10.0, 10.1, "w2", phase="final") for v in (2, 3)]
    report = run(reads=final, writes=writes, final_gets={0: 1, 1: 0})
    assert report.ok, report.failures


def test_values_never_written_are_found():
    report = run(
        reads=[
            read(0, 9, 1.0, 1.1),  # no such version
            read(0, None, 1.0, 1.1, value=encode(1, 1)),  # another chunk's bytes
            read(0, None, 1.0, 1.1, value=0),  # the fill value: a missing chunk
            read(0, 2, 1.0, 1.1),  # version 2 was only invoked after the read returned
        ],
        writes=[write(0, 2, 5.0, 5.5)],
    )
    assert report.failures["never_written"] == 4


def test_a_torn_chunk_is_found():
    report = run(reads=[read(0, 1, 1.0, 1.1, torn=True)])
    assert report.failures["torn_reads"] == 1


def test_long_operations_are_stalls():
    report = run(
        reads=[read(0, 1, 1.0, 1.0 + READ_BOUND + 0.1), read(1, 1, 1.0, 1.0 + READ_BOUND - 0.1)],
        writes=[write(0, 2, 1.0, 1.0 + WRITE_BOUND + 1.0)],
        events=[NemesisEvent("kill-index", "w2", 1.5, 1.5)],
    )
    assert report.failures["read_stalls"] == 1
    assert report.failures["write_stalls"] == 1
    assert report.examples["read_stalls"][0]["nemesis"] == ["kill-index w2 at +0.5s"]
    assert report.examples["read_stalls"][0]["cause"] == "kill"
    assert report.stats["read_stalls_by_cause"] == {"kill": 1}
    assert report.stats["kills"] == 1


def test_a_read_during_a_stop_of_its_own_worker_is_not_a_stall():
    stop = NemesisEvent("stop", "w1", 2.0, 14.0)
    report = run(
        reads=[read(0, 1, 1.0, 15.0, worker="w1"), read(1, 1, 1.0, 15.0, worker="w3")],
        writes=[write(0, 2, 1.0, 30.0, worker="w1")],
        events=[stop],
    )
    assert report.failures["read_stalls"] == 1  # w3 waited for frozen w1: that one counts
    assert report.examples["read_stalls"][0]["worker"] == "w3"
    assert report.examples["read_stalls"][0]["cause"] == "frozen worker"
    assert report.failures["write_stalls"] == 0
    assert report.stats["stops"] == 1


def test_a_write_may_wait_out_one_lease_per_further_frozen_worker():
    lease_wait = 11.5
    stops = [NemesisEvent("stop", "w2", 2.0, 12.0), NemesisEvent("stop", "w3", 13.0, 24.0)]
    history = History(
        [],
        [
            *initial(),
            write(0, 2, 1.0, 1.0 + WRITE_BOUND + lease_wait - 0.5),  # two frozen: allowed
            write(1, 2, 13.5, 13.5 + WRITE_BOUND + 0.5),  # one frozen: a stall
        ],
        stops,
        None,
    )
    report = check(history, READ_BOUND, WRITE_BOUND, lease_wait)
    assert report.failures["write_stalls"] == 1
    assert report.examples["write_stalls"][0]["chunk"] == 1


def test_errors_the_cache_caused_are_found_and_worker_deaths_are_not():
    report = run(
        reads=[
            read(0, None, 1.0, 40.0, error="KilledWorker: ('read_chunk-1', ...)"),
            read(0, None, 1.0, 1.1, error="CommClosedError: in <TCP (closed)>"),
            read(0, None, 1.0, 1.1, error="InvalidationError: the cluster could not be told"),
        ]
    )
    assert report.failures["cache_errors"] == 1
    assert report.failures["read_stalls"] == 0  # a worker death has no in-task times
    assert is_worker_death("KilledWorker: x") and not is_worker_death("OSError: y")


def test_a_read_that_never_returned_counts_as_a_stall():
    op = ReadOp(0, None, False, 1.0, 50.0, "w1", completed=False)
    report = run(reads=[op])
    assert report.failures["read_stalls"] == 1
    assert report.stats["reads_completed"] == 0


def test_more_than_one_get_per_chunk_in_the_final_phase_is_a_failure():
    report = run(final_gets={0: 1, 1: 2})
    assert report.failures["final_read_once"] == 1
    assert report.examples["final_read_once"] == [{"chunk": 1, "gets": 2}]


def test_the_report_counts_the_nemesis_and_keeps_20_examples_per_kind():
    events = [NemesisEvent("delay-peer", "w1", 1.0, 1.2)] * 3 + [
        NemesisEvent("delay-invalidate", "w2", 1.0, 1.1)
    ]
    reads = [read(0, 1, 3.0 + i, 3.1 + i) for i in range(25)]
    report = run(reads=reads, writes=[write(0, 2, 1.0, 2.0)], events=events)
    assert report.failures["stale_reads"] == 25
    assert len(report.examples["stale_reads"]) == 20
    assert report.stats["delayed_peer_replies"] == 3
    assert report.stats["delayed_invalidations"] == 1
    assert report.as_dict()["ok"] is False


# -- the delays plugin, on a fake worker ---------------------------------------------------
class FakeWorker:
    def __init__(self) -> None:
        self.name = "w9"
        self.calls: list[tuple[str, float]] = []

        async def invalidate(epoch, seq, keys, prefixes):
            self.calls.append(("invalidate", time.monotonic()))
            return seq

        async def get(key):
            self.calls.append(("get", time.monotonic()))
            return {"status": "ok", "key": key}

        self.handlers = {"zarr_cache_apply_write": invalidate, "zarr_cache_get": get}


async def test_wrapped_handlers_delay_invalidations_before_and_replies_after():
    worker = FakeWorker()
    logged = []
    wrapped = wrap_handlers(worker, lambda: 0.05, lambda: 0.05, lambda k, d: logged.append(k))
    assert sorted(wrapped) == ["zarr_cache_apply_write", "zarr_cache_get"]
    assert wrap_handlers(worker, lambda: 0.05, lambda: 0.05) == []  # never twice
    start = time.monotonic()
    assert (
        await worker.handlers["zarr_cache_apply_write"](epoch=b"e", seq=3, keys=b"", prefixes=b"")
        == 3
    )
    assert worker.calls[-1][1] - start >= 0.05  # applied only after the delay
    start = time.monotonic()
    assert (await worker.handlers["zarr_cache_get"](key="k"))["key"] == "k"
    assert worker.calls[-1][1] - start < 0.05  # computed at once ...
    assert time.monotonic() - start >= 0.05  # ... returned late
    assert logged == ["delay-invalidate", "delay-peer"]
    unwrap_handlers(worker)
    assert not hasattr(worker.handlers["zarr_cache_get"], "__chaos_wrapped__")


async def test_the_plugin_wraps_handlers_installed_after_its_setup(tmp_path):
    worker = FakeWorker()
    originals = dict(worker.handlers)
    worker.handlers.clear()  # the cache's setup has not installed them yet
    plugin = ChaosDelays(
        seed=1,
        invalidate_fraction=1.0,
        invalidate_delay=(0.01, 0.01),
        peer_fraction=0.0,
        log_dir=str(tmp_path),
    )
    await plugin.setup(worker)
    worker.handlers.update(originals)  # the cache installs its handlers
    for _ in range(100):
        if hasattr(worker.handlers["zarr_cache_apply_write"], "__chaos_wrapped__"):
            break
        await _sleep(0.01)
    await worker.handlers["zarr_cache_apply_write"](epoch=b"e", seq=1, keys=b"", prefixes=b"")
    await worker.handlers["zarr_cache_get"](key="k")
    await plugin.teardown(worker)
    assert worker.handlers["zarr_cache_apply_write"] is originals["zarr_cache_apply_write"]
    delays = read_delay_logs(str(tmp_path))
    assert [(d["kind"], d["worker"]) for d in delays] == [("delay-invalidate", "w9")]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# -- one real run ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(330)
def test_a_chaos_run_finds_nothing():
    seed = random.SystemRandom().randrange(2**31)
    print(f"chaos seed {seed}")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.chaos",
        "--seconds",
        "100",
        "--mode",
        "both",
        "--seed",
        str(seed),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the run stops its cluster on SIGTERM
        out, err = proc.communicate(timeout=30)
    print(out[-6000:])
    print(err[-2000:])
    assert proc.returncode == 0, (
        f"chaos run with --seed {seed} found failures (exit {proc.returncode})"
    )


def test_a_write_whose_first_run_died_during_it_has_no_duration_of_its_own():
    # Dask's re-run returns long after: not a stall (an "ok" write that slow still is one).
    slow = [write(0, 2, 1.0, 1.0 + WRITE_BOUND + 5, outcome="maybe")]
    assert run(writes=slow).failures["write_stalls"] == 0
    slow = [write(0, 2, 1.0, 1.0 + WRITE_BOUND + 5)]
    assert run(writes=slow).failures["write_stalls"] == 1


def test_a_write_re_run_after_its_result_was_lost_returns_the_first_run_s_result(tmp_path):
    claim = str(tmp_path / "claim")
    with open(claim, "w") as record:  # the first run wrote, then its worker died
        record.write("12.5 w1")
    assert _chaos_tasks._first_run(claim, "w2") == {
        "t_return": 12.5,
        "worker": "w1",
        "error": None,
        "rerun": False,
    }
    open(claim, "w").close()  # the first run died during its write
    assert _chaos_tasks._first_run(claim, "w2")["rerun"] is True
