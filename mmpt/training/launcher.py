"""A rank stops when its launcher dies.

torchrun starts each rank in a session of its own, so ``kill -9`` of the launcher's process group does
not reach the ranks: they would train on, holding the run lock. A rank that a launcher started asks the
kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), or, elsewhere, watches
its parent's pid from a thread. Dying there is safe: a checkpoint becomes visible only by its rename
(mmpt.training.checkpoint) and the kernel drops the run lock's flock, leaving a lock the next run takes over.

Only a launcher's child is watched (torchrun: ``TORCHELASTIC_RUN_ID``; the ``deepspeed`` launcher:
``CROSS_RANK``): a plain ``mmpt train`` started by a shell, ``nohup`` or ``setsid`` keeps running when
that parent goes. ``MMPT_WATCH_LAUNCHER=1`` (or ``0``) overrides the guess for other launchers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
# The parent as early as we can see it: the launcher may die between our start and watch_launcher().
_PARENT = os.getppid()
_watching = False


def launched() -> bool:
    """Whether a launcher (torchrun, ``deepspeed``) started this process, by the variables it sets."""
    forced = os.environ.get("MMPT_WATCH_LAUNCHER", "")
    if forced in ("0", "1"):
        return forced == "1"
    return "TORCHELASTIC_RUN_ID" in os.environ or "CROSS_RANK" in os.environ


def watch_launcher(poll_s: float = 1.0) -> bool:
    """Stop this process (SIGTERM) when its launcher dies; a no-op without a launcher or when already
    watching. Returns whether the launcher is watched."""
    global _watching
    if _watching or not launched():
        return _watching
    _watching = True
    if not _kernel_watch(signal.SIGTERM):
        threading.Thread(target=_poll, args=(poll_s,), name="mmpt-launcher-watch", daemon=True).start()
    # The kernel signals only deaths after the prctl: a launcher already gone left us re-parented.
    # (A parent pid of 1 alone proves nothing: in a container the launcher may be pid 1.)
    if os.getppid() != _PARENT:
        _launcher_died()
    return True


def _kernel_watch(sig: int) -> bool:
    """PR_SET_PDEATHSIG on Linux; False where the kernel cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll(poll_s: float) -> None:
    while os.getppid() == _PARENT:
        time.sleep(poll_s)
    _launcher_died()


def _launcher_died() -> None:
    print(f"mmpt: rank pid {os.getpid()}: its launcher (pid {_PARENT}) is gone; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
