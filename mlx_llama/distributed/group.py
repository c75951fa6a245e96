"""The distributed group this process was launched into, and the watchdog that keeps it from hanging.

`mlx.launch` (or mpirun) starts one process per rank and tells each, through
environment variables, which backend to join.  MLX's ring backend raises when a
peer's socket closes (the peer process died), but waits forever for a peer that
never connects or stops answering (a frozen or unplugged machine): the
`Watchdog` turns that silence into a one-line error and an exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

# Environment variables each launcher sets for its ranks (MLX's launcher: mlx/_distributed_utils/launch.py).
_BACKEND_ENV = (
    ("ring", "MLX_HOSTFILE"),
    ("jaccl", "MLX_JACCL_COORDINATOR"),
    ("nccl", "MLX_WORLD_SIZE"),
    ("mpi", "OMPI_COMM_WORLD_SIZE"),
    ("mpi", "PMI_SIZE"),
)


def launched_backend() -> str | None:
    """The backend a launcher started this process for, or None when it runs on its own."""
    for backend, var in _BACKEND_ENV:
        if os.environ.get(var):
            return backend
    return None


class Watchdog:
    """Exits the process with a one-line error when an armed wait makes no progress for `timeout` seconds.

    The main thread `arm`s it around waits on other ranks and `beat`s after every
    completed exchange; a daemon thread checks.  `os._exit` because the stuck
    thread sits inside MLX's C++ recv, where no Python exception can reach it.
    """

    def __init__(self, timeout: float, who: str) -> None:
        self.timeout = timeout
        self.who = who
        self._what: str | None = None
        self._last = time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="pipeline-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        with self._lock:
            self._what, self._last = what, time.monotonic()

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._what = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                stuck = self._what is not None and time.monotonic() - self._last > self.timeout
                what = self._what
            if stuck:
                sys.stdout.flush()
                sys.stderr.write(f"Error: {self.who}: {what}: nothing from the other ranks for {self.timeout:g} s "
                                 "(a rank stopped or its network is down; --pipeline-timeout sets the limit)\n")
                sys.stderr.flush()
                os._exit(1)


@dataclass
class PipelineGroup:
    group: mx.distributed.Group
    backend: str  # "ring", "mpi", ...; "none" for a process on its own
    watchdog: Watchdog

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def who(self) -> str:
        """How messages name this rank: its number and host."""
        return self.watchdog.who


_DEADLINE = """
import os, signal, sys, time
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == parent:
    sys.stderr.write(message + "\\n")
    os.kill(parent, signal.SIGTERM)
"""


@contextmanager
def _deadline_process(timeout: float, message: str) -> Iterator[None]:
    """End this process with `message` unless the block finishes within `timeout` seconds.

    MLX's `init` holds the GIL while it connects, so no thread of ours could run
    then: a child process keeps the deadline (and SIGTERM ends us from outside).
    """
    child = subprocess.Popen([sys.executable, "-c", _DEADLINE, str(os.getpid()), str(timeout), message])
    try:
        yield
    finally:
        child.kill()
        child.wait()


def join_group(timeout: float) -> PipelineGroup:
    """Join the group the launcher started this process in (a group of one when there is none).

    Connecting is bounded by `timeout`: a rank whose peers never come up exits with an error.
    """
    backend = launched_backend()
    rank = int(os.environ.get("MLX_RANK", "0"))
    watchdog = Watchdog(timeout, f"rank {rank} ({socket.gethostname()})")
    if backend is None:
        return PipelineGroup(mx.distributed.init(strict=False, backend="ring"), "none", watchdog)
    message = (f"Error: {watchdog.who}: connecting to the other ranks over {backend}: no answer for {timeout:g} s "
               "(is every rank started, and are the addresses right? --pipeline-timeout sets the limit)")
    try:
        with _deadline_process(timeout, message):
            group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        from mlx_llama.errors import MlxLlamaError

        raise MlxLlamaError(f"{watchdog.who}: cannot join the {backend} group: {e}") from None
    watchdog.who = f"rank {group.rank()} ({socket.gethostname()})"
    return PipelineGroup(group, backend, watchdog)
