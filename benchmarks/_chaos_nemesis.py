"""The chaos suite's nemesis: kills and freezes worker processes, and records each action.

Every ``uniform(3, 7)`` seconds it does one of:

- ``kill``: SIGKILL a random worker process (its nanny starts it again, same name);
- ``kill-index``: SIGKILL the worker hosting index shard 0 (scheduler handler
  ``zarr_cache_index``);
- ``kill`` + ``kill-restarted``: SIGKILL a worker, then SIGKILL it again right after its
  nanny restarted it (as soon as the same name is back at the scheduler);
- ``stop``: SIGSTOP a random worker for ``uniform(3, 15)`` seconds, then SIGCONT.

Only worker processes are signalled: a pid is signalled only if its parent is one of the
nannies this run started (never the scheduler, a nanny, or this process).  Everything
stopped is continued before :meth:`Nemesis.stop` returns, also after an error.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchmarks._chaos_history import NemesisEvent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from distributed import Client

__all__ = ["ACTIONS", "Nemesis", "WorkerProcess", "index_host", "process_start_time"]

#: Actions and their weights.
ACTIONS = {"kill": 0.3, "kill-index": 0.25, "kill-twice": 0.15, "stop": 0.3}
#: Seconds between actions, and of a freeze (uniform bounds).
INTERVAL = (3.0, 7.0)
STOP_FOR = (3.0, 15.0)
#: At most this many workers frozen at once.
MAX_STOPPED = 2
#: Seconds to wait for a killed worker to be back (kill-twice), and for any client call.
RESTART_WAIT = 30.0
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerProcess:
    """A worker process as the nemesis knows it."""

    name: str
    address: str
    pid: int
    started: int  #: start time (clock ticks since boot): tells a reused pid apart


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if it is gone (or dead).

    Parameters
    ----------
    pid : int
        A process id.

    Returns
    -------
    int or None
        Field 22 of ``/proc/<pid>/stat``; ``None`` for no such process, or a zombie.

    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # killed, not reaped yet
        return None
    return int(fields[19])  # field 22 of stat, counted after "pid (comm)"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def index_host(client: Client, shard: int = 0) -> str | None:
    """Address of the worker hosting index ``shard`` (``None`` while it is re-created).

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster.
    shard : int
        Index shard.

    Returns
    -------
    str or None
        From the scheduler handler ``zarr_cache_index``.

    """
    layout = client.sync(client.scheduler.zarr_cache_index, callback_timeout=CALL_TIMEOUT)
    if not layout or shard >= len(layout) or layout[shard] is None:
        return None
    return layout[shard]["address"]


class Nemesis:
    """A thread that kills and freezes worker processes at random.

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster.
    nanny_pids : callable
        Returns the pids of the nannies this run started (the only parents whose children
        may be signalled).
    seed : int
        Seed of the run (the nemesis draws from its own ``Random``).
    actions : dict, optional
        Action kinds and weights (default :data:`ACTIONS`); empty: the nemesis does nothing.
    clock : callable
        Wall clock for the events (``time.time``, as the tasks use).

    """

    def __init__(
        self,
        client: Client,
        nanny_pids: Callable[[], Iterable[int]],
        seed: int,
        actions: dict[str, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.nanny_pids = nanny_pids
        self.rng = random.Random(f"nemesis:{seed}")
        self.actions = dict(ACTIONS if actions is None else actions)
        self.clock = clock
        self.events: list[NemesisEvent] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pids: dict[str, int] = {}  # address -> pid
        # Frozen workers: pid -> (process, when, timer that thaws it).
        self._stopped: dict[int, tuple[WorkerProcess, float, threading.Timer]] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start acting (in a daemon thread)."""
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 45.0) -> None:
        """Stop acting and continue every frozen worker (also if the thread is stuck).

        Parameters
        ----------
        timeout : float
            Seconds to wait for the current action (a kill-twice waits for a restart).

        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.cont_all()

    def cont_all(self) -> None:
        """SIGCONT every worker this nemesis froze (and record the end of each freeze)."""
        with self._lock:
            pids = list(self._stopped)
        for pid in pids:
            self._thaw(pid)

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.wait(self.rng.uniform(*INTERVAL)):
                if not self.actions:
                    continue
                kinds, weights = zip(*self.actions.items(), strict=True)
                kind = self.rng.choices(kinds, weights)[0]
                try:
                    self._act(kind)
                except Exception as err:  # recorded, the nemesis goes on
                    self._record("error", "", self.clock(), detail=f"{kind}: {err!r}"[:300])
        finally:
            self.cont_all()

    def _act(self, kind: str) -> None:
        workers = self.workers()
        if not workers:
            raise RuntimeError("no worker process found")
        if kind == "kill":
            self._kill(self.rng.choice(workers), "kill")
        elif kind == "kill-index":
            address = index_host(self.client)
            target = next((w for w in workers if w.address == address), None)
            if target is None:
                raise RuntimeError(f"index host {address} is not a known worker")
            self._kill(target, "kill-index")
        elif kind == "kill-twice":
            first = self.rng.choice(workers)
            self._kill(first, "kill", detail="twice")
            again = self._wait_restarted(first)
            self._kill(again, "kill-restarted")
        elif kind == "stop":
            with self._lock:
                frozen = {p.pid for p, _, _ in self._stopped.values()}
            candidates = [w for w in workers if w.pid not in frozen]
            if len(frozen) >= MAX_STOPPED or not candidates:
                self._kill(self.rng.choice(workers), "kill", detail="instead of a stop")
                return
            self._freeze(self.rng.choice(candidates), self.rng.uniform(*STOP_FOR))
        else:
            raise ValueError(f"unknown nemesis action {kind!r}")

    # -- finding worker processes ----------------------------------------------------------
    def workers(self) -> list[WorkerProcess]:
        """The worker processes running now, by name.

        Returns
        -------
        list of WorkerProcess
            Name and address from the scheduler, pid from ``client.run(os.getpid)`` (asked
            once per address, never of a frozen worker), each checked to be a child of one
            of the nannies.

        """
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        with self._lock:
            frozen = {p.address for p, _, _ in self._stopped.values()}
        unknown = [a for a in info if a not in self._pids and a not in frozen]
        if unknown:
            pids = self.client.run(
                os.getpid, workers=unknown, on_error="ignore", callback_timeout=CALL_TIMEOUT
            )
            self._pids.update(pids)
        found = []
        for address, worker in sorted(info.items(), key=lambda kv: str(kv[1]["name"])):
            pid = self._pids.get(address)
            started = None if pid is None else process_start_time(pid)
            if pid is not None and started is not None and self._is_worker(pid):
                found.append(WorkerProcess(str(worker["name"]), address, pid, started))
        return found

    def _is_worker(self, pid: int) -> bool:
        nannies = set(self.nanny_pids())
        return pid != os.getpid() and pid not in nannies and _parent(pid) in nannies

    def _alive(self, process: WorkerProcess) -> bool:
        return process_start_time(process.pid) == process.started and self._is_worker(process.pid)

    def _wait_restarted(self, dead: WorkerProcess) -> WorkerProcess:
        deadline = time.monotonic() + RESTART_WAIT
        while time.monotonic() < deadline and not self._stopping.is_set():
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            back = [a for a, w in info.items() if str(w["name"]) == dead.name]
            if back and back[0] != dead.address:
                for process in self.workers():
                    if process.address == back[0]:
                        return process
            time.sleep(0.05)
        raise RuntimeError(f"{dead.name} did not come back within {RESTART_WAIT} s")

    # -- signals -----------------------------------------------------------------------------
    def _kill(self, process: WorkerProcess, kind: str, detail: str = "") -> None:
        if not self._alive(process):
            raise RuntimeError(f"{process.name} (pid {process.pid}) is gone already")
        now = self.clock()
        os.kill(process.pid, signal.SIGKILL)
        self._record(kind, process.name, now, detail=detail)
        with self._lock:
            entry = self._stopped.pop(process.pid, None)
        if entry is not None:  # killed while frozen: the freeze ends here
            entry[2].cancel()
            self._record("stop", process.name, entry[1], end=now, detail="ended by a kill")

    def _freeze(self, process: WorkerProcess, seconds: float) -> None:
        if not self._alive(process):
            raise RuntimeError(f"{process.name} (pid {process.pid}) is gone already")
        timer = threading.Timer(seconds, self._thaw, args=(process.pid,))
        timer.daemon = True
        with self._lock:
            now = self.clock()
            os.kill(process.pid, signal.SIGSTOP)
            self._stopped[process.pid] = (process, now, timer)
        timer.start()

    def _thaw(self, pid: int) -> None:
        with self._lock:
            entry = self._stopped.pop(pid, None)
        if entry is None:
            return
        process, since, timer = entry
        timer.cancel()
        if self._alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._record("stop", process.name, since, end=self.clock())

    def _record(
        self, kind: str, target: str, start: float, end: float | None = None, detail: str = ""
    ) -> None:
        event = NemesisEvent(kind, target, start, start if end is None else end, detail)
        with self._lock:
            self.events.append(event)

    def summary(self) -> dict[str, Any]:
        """Events per kind so far."""
        counts: dict[str, int] = {}
        with self._lock:
            for e in self.events:
                counts[e.kind] = counts.get(e.kind, 0) + 1
        return counts
