"""Atomic, resumable checkpoints on top of DeepSpeed's ``save_checkpoint``.

Layout: ``RUN/checkpoints/step_00000100/`` (DeepSpeed files + ``rank_<r>.json`` with each rank's
data position and RNG state) and ``RUN/checkpoints/latest`` naming the newest complete one. A save
writes ``step_N.tmp`` first, every rank finishes, then rank 0 renames it and rewrites ``latest``
atomically, so a crash during a save leaves the previous checkpoint as ``latest`` and loadable.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class InjectedFault(RuntimeError):
    """Raised by the fault-injection switches (train.crash_at_step, train.crash_in_save) in tests."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-safe values."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    def unb64(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(unb64(state["cuda"]))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, run_dir: str | Path, step: int, client: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int, crash_in_save: bool = False) -> Path:
    """Save a checkpoint atomically on every rank; returns its final path."""
    root = ckpt_root(run_dir)
    tag = f"step_{step:08d}"
    tmp_tag = f"{tag}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # debris of an earlier failed save
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False)
    (root / tmp_tag).mkdir(parents=True, exist_ok=True)
    with open(root / tmp_tag / f"rank_{rank}.json", "w") as f:
        json.dump({**rank_state, "rng": rng_state()}, f)
    _barrier()
    if crash_in_save:
        raise InjectedFault(f"injected crash inside the save of {tag}")
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep_last)
    _barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(path_or_latest: str, run_dir: str | Path) -> Path | None:
    """Find the checkpoint directory for ``--resume``: 'latest' (None if the run has none yet), a run
    directory, a ``checkpoints`` folder or a ``step_*`` folder."""
    p = Path(run_dir) if path_or_latest == "latest" else Path(path_or_latest)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.exists():
            found = root / latest.read_text().strip()
            if not found.is_dir():
                raise FileNotFoundError(f"{latest} names {found.name}, which does not exist")
            return found
    if p.name.startswith("step_") and p.is_dir():
        return p
    if path_or_latest == "latest":
        return None
    raise FileNotFoundError(f"--resume {path_or_latest}: no checkpoint found (expected a run directory, "
                            "its checkpoints/ folder or a step_* folder)")


def load(engine: Any, ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns (client, rank_state)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    _, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")
    path = ckpt / f"rank_{rank}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: was the checkpoint written with a different world size?")
    with open(path) as f:
        rank_state = json.load(f)
    set_rng_state(rank_state.pop("rng"))
    return client, rank_state
