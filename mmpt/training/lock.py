"""One writer per run directory: ``RUN/mmpt.lock``, held with ``fcntl.flock`` for the life of the run.

The kernel drops a flock when its holder dies (``kill -9`` included), so a lock we can take is never
held by a live run; the file's text (host, pid, start time) names the holder for the refusal message
and, when a dead run left it behind, for the take-over warning. Ranks stop when their torchrun or
``deepspeed`` launcher dies (mmpt.training.launcher), dropping the lock; ranks another launcher left running
keep rank 0's lock, so a ``--resume`` beside them is refused. flock is not reliable on every network
file system (NFS before v4 locks per host): there the lock protects only against runs on one host.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from mmpt.registry import ConfigError

LOCK_NAME = "mmpt.lock"


class RunLock:
    """Exclusive lock on a run directory (``with RunLock(run_dir): ...`` or acquire/release)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> RunLock:
        """Take the lock or raise ConfigError naming its holder; warn when taking over a dead run's lock."""
        self._made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by {holder} (lock file {self.path}); stop that run "
                              "first (its ranks may outlive a killed torchrun) or use another train.out_dir") from None
        previous = _read(fd)
        if previous.get("pid") is not None:
            warnings.warn(f"{self.path}: taking over the lock of {_describe(previous)}, which is no longer running",
                          stacklevel=2)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's record (a clean exit leaves nothing to take over) and unlock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if self._made_dir and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            # a run that failed before writing anything leaves no directory behind
            self.path.unlink()
            self.path.parent.rmdir()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (no holder recorded)"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"
