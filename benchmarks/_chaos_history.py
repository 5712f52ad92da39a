"""The chaos suite's history and its checker: pure, no I/O, unit-tested.

A run records every read and write the workload made and every action of the nemesis
(kills, stops, late messages); :func:`check` then looks for what the cache promises never
happens (docs/consistency.md, docs/failure-model.md):

- a **stale read**: a read that started after a write of its chunk returned, but saw an
  older version;
- a **value never written**: bytes that are no version of that chunk ever attempted, or a
  version whose write was only invoked after the read returned;
- a **torn chunk**: one read whose elements are not all equal (two versions mixed);
- a **stall**: an operation longer than its bound, unless its own worker was frozen
  (SIGSTOP) meanwhile: a frozen worker's tasks are frozen too, and their times are taken
  inside the task;
- an **error the cache caused**: any exception of a read or write that is not Dask's own
  outcome of a worker dying (``KilledWorker``, a closed comm);
- **read-once** in the final phase: more than one GET of a chunk at the source while every
  worker reads every chunk twice.

Value encoding: chunk ``i`` at version ``v`` holds ``v * 10_000 + i`` in every element.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "ENCODING_BASE",
    "WORKER_DEATH_MARKERS",
    "History",
    "NemesisEvent",
    "ReadOp",
    "Report",
    "WriteOp",
    "check",
    "decode",
    "encode",
    "is_worker_death",
]

#: ``value = version * ENCODING_BASE + chunk``: chunks must stay below it.
ENCODING_BASE = 10_000
#: Error texts that are Dask's outcome of a worker dying, not an error of the operation.
WORKER_DEATH_MARKERS = (
    "KilledWorker",
    "CommClosedError",
    "StreamClosedError",
    "worker lost",
    "Worker lost",
    "has been lost",
)
#: Offending operations kept per failure kind.
EXAMPLES = 20
#: Nemesis kinds that are SIGKILLs / SIGSTOPs / late messages.
KILL_KINDS = ("kill", "kill-index", "kill-restarted")
STOP_KIND = "stop"
DELAY_INVALIDATE, DELAY_PEER = "delay-invalidate", "delay-peer"

Outcome = Literal["ok", "failed", "maybe"]
Origin = Literal["client", "task", "initial"]


def encode(chunk: int, version: int) -> int:
    """The element value of ``chunk`` at ``version``.

    Parameters
    ----------
    chunk : int
        Chunk number, below :data:`ENCODING_BASE`.
    version : int
        Version of the chunk (1: as created).

    Returns
    -------
    int
        ``version * ENCODING_BASE + chunk``.

    Raises
    ------
    ValueError
        If ``chunk`` is out of range.

    """
    if not 0 <= chunk < ENCODING_BASE:
        raise ValueError(f"chunk {chunk} out of range")
    return version * ENCODING_BASE + chunk


def decode(value: int) -> tuple[int, int]:
    """``(chunk, version)`` of an element value (see :func:`encode`).

    Parameters
    ----------
    value : int
        An element read from the array.

    Returns
    -------
    tuple of int
        The chunk and version it encodes (the fill value 0 decodes to chunk 0, version 0).

    """
    version, chunk = divmod(int(value), ENCODING_BASE)
    return chunk, version


def is_worker_death(error: str) -> bool:
    """Whether an error text is Dask's outcome of a worker dying (not the op's error).

    Parameters
    ----------
    error : str
        An operation's error, as recorded.

    Returns
    -------
    bool
        True if it holds one of :data:`WORKER_DEATH_MARKERS`.

    """
    return any(marker in error for marker in WORKER_DEATH_MARKERS)


@dataclass(frozen=True, slots=True)
class ReadOp:
    """One read of one chunk.

    ``t_invoke``/``t_return`` are taken inside the task, around the store read.  A read
    that never returned (``completed=False``) has the client's submit time and the time it
    gave up instead, and no value.
    """

    chunk: int
    value: int | None
    torn: bool
    t_invoke: float
    t_return: float
    worker: str | None
    error: str | None = None
    completed: bool = True
    phase: str = "chaos"

    @property
    def duration(self) -> float:
        """Seconds between invoke and return."""
        return self.t_return - self.t_invoke


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One write of one whole chunk at ``version``.

    ``t_invoke`` is taken on the client before submitting, ``t_return`` right after the
    store write returned (inside the task, or on the client).  ``outcome`` ``"failed"`` (the
    write raised) or ``"maybe"`` (its worker died, or no answer came) means the version may
    or may not be visible.
    """

    chunk: int
    version: int
    t_invoke: float
    t_return: float
    origin: Origin
    worker: str | None
    outcome: Outcome
    error: str | None = None

    @property
    def duration(self) -> float:
        """Seconds between invoke and return."""
        return self.t_return - self.t_invoke


@dataclass(frozen=True, slots=True)
class NemesisEvent:
    """One action of the nemesis on ``target`` (a worker name) from ``t_start`` to ``t_end``.

    Kinds: ``kill``, ``kill-index`` (the index shard's host), ``kill-restarted`` (killed
    again right after its nanny restarted it), ``stop`` (SIGSTOP until SIGCONT),
    ``delay-invalidate`` and ``delay-peer`` (a late message), ``error`` (an action that
    could not be done, with ``detail``).
    """

    kind: str
    target: str
    t_start: float
    t_end: float
    detail: str = ""


@dataclass
class History:
    """Everything one run did; ``final_gets`` are the final phase's GETs per chunk."""

    reads: list[ReadOp] = field(default_factory=list)
    writes: list[WriteOp] = field(default_factory=list)
    events: list[NemesisEvent] = field(default_factory=list)
    final_gets: dict[int, int] | None = None


@dataclass
class Report:
    """What :func:`check` found: counts per failure kind, examples, and run statistics."""

    failures: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    stats: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Whether the checker found nothing."""
        return not any(self.failures.values())

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data."""
        return {
            "ok": self.ok,
            "failures": self.failures,
            "stats": self.stats,
            "examples": self.examples,
        }


FAILURE_KINDS = (
    "stale_reads",
    "never_written",
    "torn_reads",
    "read_stalls",
    "write_stalls",
    "cache_errors",
    "final_read_once",
)


def check(
    history: History, read_stall_bound: float, write_stall_bound: float, lease_wait: float = 0.0
) -> Report:
    """Check a history for the failures the cache promises never happen.

    Parameters
    ----------
    history : History
        Reads, writes (include each chunk's initial version as a write) and nemesis events.
    read_stall_bound, write_stall_bound : float
        Seconds a read or write may take, unless a SIGSTOP of its own worker overlaps it.
    lease_wait : float
        Seconds a write may wait for one frozen worker's lease to run out: a write during
        which ``n`` workers were frozen may take ``(n - 1) * lease_wait`` longer (writes
        from one process go one batch at a time, so each can wait out another freeze).

    Returns
    -------
    Report
        Failure counts (:data:`FAILURE_KINDS`), the first :data:`EXAMPLES` offending
        operations of each kind, and statistics of the run.

    """
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in FAILURE_KINDS}
    writes_by_chunk: dict[int, list[WriteOp]] = defaultdict(list)
    for w in history.writes:
        writes_by_chunk[w.chunk].append(w)
    # Per chunk: successful writes by return time, with the running highest version.
    returned: dict[int, tuple[list[float], list[int]]] = {}
    for chunk, ws in writes_by_chunk.items():
        ok = sorted((w for w in ws if w.outcome == "ok"), key=lambda w: w.t_return)
        highest, running = [], 0
        for w in ok:
            running = max(running, w.version)
            highest.append(running)
        returned[chunk] = ([w.t_return for w in ok], highest)
    # Per chunk and version: the earliest invoke of an attempt.
    attempted: dict[tuple[int, int], float] = {}
    for w in history.writes:
        key = (w.chunk, w.version)
        attempted[key] = min(w.t_invoke, attempted.get(key, w.t_invoke))
    stops: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in history.events:
        if e.kind == STOP_KIND:
            stops[e.target].append((e.t_start, e.t_end))

    def frozen_during(worker: str | None, start: float, end: float) -> bool:
        return worker is not None and any(s <= end and e >= start for s, e in stops[worker])

    def errors_and_stalls(op: ReadOp | WriteOp, bound: float, stalls: str) -> None:
        died = op.error is not None and is_worker_death(op.error)  # no times from a task
        # A write whose first run died during it returns from Dask's re-run: no time of its own.
        untimed = died or (isinstance(op, WriteOp) and op.outcome == "maybe")
        if op.error is not None and not died:
            found["cache_errors"].append(_describe(op))
        if isinstance(op, WriteOp):
            frozen = sum(frozen_during(w, op.t_invoke, op.t_return) for w in stops)
            bound += lease_wait * max(0, frozen - 1)
        if (
            not untimed
            and op.duration > bound
            and not frozen_during(op.worker, op.t_invoke, op.t_return)
        ):
            found[stalls].append(_describe(op, _around(history.events, op)))

    for r in history.reads:
        errors_and_stalls(r, read_stall_bound, "read_stalls")
        if r.value is None:
            continue
        if r.torn:
            found["torn_reads"].append(_describe(r))
        chunk, version = decode(r.value)
        invoked = attempted.get((r.chunk, version))
        if chunk != r.chunk or invoked is None or invoked > r.t_return:
            found["never_written"].append(_describe(r, {"decoded": [chunk, version]}))
            continue
        times, highest = returned.get(r.chunk, ([], []))
        n = bisect.bisect_left(times, r.t_invoke)  # writes that returned before it started
        if n and highest[n - 1] > version:
            late = round(r.t_invoke - times[n - 1], 3)  # since the last write returned
            found["stale_reads"].append(
                _describe(
                    r,
                    {"saw": version, "expected_at_least": highest[n - 1], "started_after": late},
                )
            )
    for w in history.writes:
        if w.origin != "initial":
            errors_and_stalls(w, write_stall_bound, "write_stalls")
    if history.final_gets is not None:
        for chunk, gets in sorted(history.final_gets.items()):
            if gets > 1:
                found["final_read_once"].append({"chunk": chunk, "gets": gets})
    stats = _stats(history)
    # Reads over 2 s on a worker that was not frozen itself, by what was near them: a
    # killed host must cost a read less than 2 s; a frozen one up to zarr-cache.read-timeout.
    slow: dict[str, int] = defaultdict(int)
    for r in history.reads:
        if r.phase != "final" and r.duration > 2.0:
            if not frozen_during(r.worker, r.t_invoke, r.t_return):
                slow[_around(history.events, r)["cause"]] += 1
    stats["reads_over_2s_not_frozen_by_cause"] = dict(slow)
    for kind in ("read_stalls", "write_stalls"):
        causes: dict[str, int] = defaultdict(int)
        for op in found[kind]:
            causes[op["cause"]] += 1
        stats[f"{kind}_by_cause"] = dict(causes)
    return Report(
        failures={kind: len(ops) for kind, ops in found.items()},
        examples={kind: ops[:EXAMPLES] for kind, ops in found.items() if ops},
        stats=stats,
    )


def _describe(op: ReadOp | WriteOp, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    described = {"op": type(op).__name__, **asdict(op), "duration": round(op.duration, 3)}
    return {**described, **(extra or {})}


def _around(events: list[NemesisEvent], op: ReadOp | WriteOp) -> dict[str, Any]:
    """The kills and stops near an operation (what it may have waited for), and a guess.

    ``cause`` is ``"frozen worker"`` if another worker was stopped during it, ``"kill"``
    if a worker was killed from 2 s before it started until it ended, both, or ``"none"``.
    """
    near = [
        e
        for e in events
        if (e.kind in KILL_KINDS or e.kind == STOP_KIND)
        and e.t_start <= op.t_return
        and e.t_end >= op.t_invoke - 2.0
    ]
    frozen = any(
        e.kind == STOP_KIND and e.target != op.worker and e.t_end >= op.t_invoke for e in near
    )
    killed = any(e.kind in KILL_KINDS for e in near)
    cause = " and ".join(c for c, on in (("frozen worker", frozen), ("kill", killed)) if on)
    described = [f"{e.kind} {e.target} at {e.t_start - op.t_invoke:+.1f}s" for e in near]
    return {"nemesis": described[:10], "cause": cause or "none"}


def _stats(history: History) -> dict[str, Any]:
    reads = [r for r in history.reads if r.phase != "final"]
    final = [r for r in history.reads if r.phase == "final"]
    writes = [w for w in history.writes if w.origin != "initial"]
    kinds: dict[str, int] = defaultdict(int)
    for e in history.events:
        kinds[e.kind] += 1
    outcomes: dict[str, int] = defaultdict(int)
    for w in writes:
        outcomes[w.outcome] += 1
    durations = sorted((r.duration for r in reads), reverse=True)
    write_durations = sorted((w.duration for w in writes), reverse=True)
    return {
        "reads": len(reads),
        "reads_completed": sum(r.completed and r.value is not None for r in reads),
        "final_reads": len(final),
        "writes": len(writes),
        "write_outcomes": dict(outcomes),
        "client_writes": sum(w.origin == "client" for w in writes),
        "task_writes": sum(w.origin == "task" for w in writes),
        "kills": sum(kinds[k] for k in KILL_KINDS),
        "kills_by_kind": {k: kinds[k] for k in KILL_KINDS if kinds[k]},
        "stops": kinds[STOP_KIND],
        "delayed_invalidations": kinds[DELAY_INVALIDATE],
        "delayed_peer_replies": kinds[DELAY_PEER],
        "nemesis_errors": kinds["error"],
        "worst_reads": [round(d, 3) for d in durations[:5]],
        "worst_writes": [round(d, 3) for d in write_durations[:5]],
        "reads_over_2s": sum(d > 2.0 for d in durations),
    }
