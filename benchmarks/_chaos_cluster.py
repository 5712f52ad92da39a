"""Real ``dask scheduler`` / ``dask worker`` processes on loopback for the chaos suite.

Each process runs in a process group of its own (a nanny's worker process is in its
nanny's group), so :meth:`ProcessCluster.close` stops everything a run started, whatever
state it is in (frozen included: SIGKILL ends stopped processes too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["CHECKOUT", "ProcessCluster", "free_port"]

#: The checkout this file belongs to: on the processes' ``PYTHONPATH``, so tasks defined
#: in ``benchmarks/`` unpickle on the workers.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Runs ``python -m dask <args>`` in this process, after asking the kernel to SIGKILL it
#: if the process that started it dies (``PR_SET_PDEATHSIG``, kept across ``exec``): no
#: cluster outlives its run, even one killed with SIGKILL.
_LAUNCH = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'dask', *sys.argv[1:]])"
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcessCluster:
    """A scheduler and named workers, each ``python -m dask ...`` in its own process group.

    Each dies with the process that started it (see :data:`_LAUNCH`).

    Parameters
    ----------
    root : str
        Directory for logs and the workers' local directories.
    env : mapping
        Extra environment of every process (dask config, e.g. ``DASK_ZARR_CACHE__*``).
    preload : bool
        Start every process with ``--preload dask_zarr_cache.preload``.
    nanny : bool
        Start workers under a nanny (which restarts a killed worker under its name).

    """

    def __init__(
        self, root: str, env: Mapping[str, str], preload: bool = True, nanny: bool = True
    ) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        path = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, **env, "PYTHONPATH": path}
        self.preload = ["--preload", "dask_zarr_cache.preload"] if preload else []
        self.nanny = nanny
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        os.makedirs(os.path.join(root, "logs"), exist_ok=True)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.root, "logs", f"{name}.log"), "ab")
        try:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own
            )
        finally:
            log.close()

    def start_scheduler(self) -> None:
        """Start the scheduler and wait (30 s at most) until it accepts connections."""
        self._spawn(
            "scheduler",
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dashboard-address",
                "127.0.0.1:0",
                *self.preload,
            ],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.processes["scheduler"].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the scheduler did not start; see {self.root}/logs/scheduler.log")

    def start_worker(self, name: str, nthreads: int = 2) -> None:
        """Start worker ``name`` (with its nanny unless ``nanny=False``).

        Parameters
        ----------
        name : str
            ``--name`` of the worker (a nanny restarts it under the same name, so it finds
            its cache directory again).
        nthreads : int
            Threads of the worker.

        """
        local = os.path.join(self.root, "local", name)
        os.makedirs(local, exist_ok=True)
        self._spawn(
            name,
            [
                "worker",
                self.address,
                "--nanny" if self.nanny else "--no-nanny",
                "--name",
                name,
                "--nthreads",
                str(nthreads),
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                "127.0.0.1:0",
                "--local-directory",
                local,
                *self.preload,
            ],
        )

    def nanny_pids(self) -> list[int]:
        """Pids of the worker commands started (the nannies, with ``nanny=True``)."""
        return [p.pid for name, p in self.processes.items() if name != "scheduler"]

    def scheduler_pid(self) -> int | None:
        """Pid of the scheduler process."""
        proc = self.processes.get("scheduler")
        return None if proc is None else proc.pid

    def kill(self, name: str) -> None:
        """SIGKILL the process group of ``name`` and reap it.

        Parameters
        ----------
        name : str
            ``"scheduler"`` or a worker's name.

        """
        proc = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def close(self) -> None:
        """SIGKILL every process group this cluster started (workers first)."""
        for name in [n for n in self.processes if n != "scheduler"] + ["scheduler"]:
            if name in self.processes:
                self.kill(name)
