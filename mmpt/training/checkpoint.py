"""Atomic, verified, resumable checkpoints on top of DeepSpeed's ``save_checkpoint``.

Layout: ``RUN/checkpoints/step_00000100/`` (DeepSpeed files, ``rank_<r>.json`` with each rank's data
position and RNG state, ``checkpoint.json`` with the resolved config and world size, ``manifest.json``
with every file's size and sha256) and ``RUN/checkpoints/latest`` naming the newest complete one. A
save writes ``step_N.tmp`` first, every rank finishes, then rank 0 renames it and rewrites ``latest``
atomically, so a crash during a save leaves the previous checkpoint as ``latest`` and loadable.
Every checkpoint is verified against its manifest before use; ``find`` falls back from a damaged one.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmpt.formats.safe_load import check_pickles, restricted_unpickling
from mmpt.registry import ConfigError
from mmpt.training.rank0 import first_from_any_rank, on_rank0

MANIFEST = "manifest.json"
META = "checkpoint.json"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection switches (train.crash_at_step, train.crash_in_save) in tests."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, damaged, or cannot resume this run."""


def ckpt_root(run_dir: str | Path) -> Path:
    """Where a run directory keeps its checkpoints."""
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


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, run_dir: str | Path, step: int, client: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int, crash_in_save: bool = False, config: dict[str, Any] | None = None) -> Path:
    """Save a checkpoint atomically on every rank (with its config and checksum manifest); returns its path.
    A full disk on any rank removes the partial folder and raises :class:`DiskFullError` on every rank."""
    root = ckpt_root(run_dir)
    tag = f"step_{step:08d}"
    tmp = root / f"{tag}.tmp"
    rank, world = _rank_world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier failed save
    _barrier()
    failed = _full_disk(lambda: engine.save_checkpoint(str(root), tag=tmp.name, client_state=client,
                                                       save_latest=False), tmp)
    if failed:
        _barrier()  # the closing barrier of DeepSpeed's save, which the exception skipped on this rank

    def write_states() -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / f"rank_{rank}.json", "w") as f:
            json.dump({**rank_state, "rng": rng_state()}, f)
        if rank == 0:
            (tmp / META).write_text(json.dumps({"step": step, "world_size": world, "config": config}, default=str))

    _agree(failed or _full_disk(write_states, tmp), tmp)
    # each rank hashes every world-th file: the cost splits over ranks
    _agree(_full_disk(lambda: _hash_share(tmp, rank, world), tmp), tmp)
    if crash_in_save:
        raise InjectedFault(f"injected crash inside the save of {tag}")

    def publish() -> None:
        _merge_manifest(tmp, world)
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep_last)

    _agree(_full_disk(publish, tmp) if rank == 0 else None, tmp)
    return root / tag


class DiskFullError(CheckpointError):
    """The disk filled up during a save: the partial checkpoint was removed, the previous one is intact."""


def _full_disk(write: Any, tmp: Path) -> str | None:
    """Run ``write``; the file it was writing when the disk filled up (ENOSPC, or torch's zip writer failing
    with \"unexpected pos\"), else None. Other errors propagate."""
    try:
        write()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return str(exc.filename or _newest_file(tmp))
    except RuntimeError as exc:
        # torch's zip writer says neither why nor where: a full disk only if the disk is (nearly) full now
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc) or free_bytes(tmp) > LOW_SPACE:
            raise
        return str(_newest_file(tmp))  # the file written last is the torn one
    return None


LOW_SPACE = 64 * 2**20  # free bytes below which a failed torch write is taken for a full disk


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _newest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=folder)


def _agree(failed: str | None, tmp: Path) -> None:
    """A barrier that also tells every rank whether a rank ran out of disk; if one did, rank 0 removes what
    the save wrote and every rank raises the same DiskFullError."""
    rank, _ = _rank_world()
    failed = first_from_any_rank(failed)
    if failed is None:
        return
    root = tmp.parent
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        final, latest = root / tmp.name.removesuffix(".tmp"), root / "latest"
        if not (latest.exists() and latest.read_text().strip() == final.name):
            shutil.rmtree(final, ignore_errors=True)  # renamed but never published as latest
        latest.with_suffix(".tmp").unlink(missing_ok=True)
    _barrier()
    intact, _ = _candidates(root)
    was = f"the step-{step_of(intact[0])} checkpoint is intact" if intact else "no checkpoint was written yet"
    raise DiskFullError(f"no space left writing {failed}; {was} (free space, then resume with --resume latest)")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (~1.3 GB/s from the page cache here: a fifth of a save's time, split over ranks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _hash_share(ckpt: Path, rank: int, world: int) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and not p.name.startswith("manifest"))
    part = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files[rank::world]}
    (ckpt / f"manifest.part{rank}.json").write_text(json.dumps(part))


def _merge_manifest(ckpt: Path, world: int) -> None:
    files: dict[str, Any] = {}
    for r in range(world):
        part = ckpt / f"manifest.part{r}.json"
        files.update(json.loads(part.read_text()))
        part.unlink()
    _write_atomic(ckpt / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=0))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = _complete(root)
    for old in done[keep_last:] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _complete(root: Path) -> list[Path]:
    """Finished checkpoint folders under ``root``, newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)


def verify(ckpt: Path) -> str | None:
    """What is wrong with ``ckpt`` (a missing, resized or changed file, no manifest), or None if intact."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():
        path = ckpt / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"{MANIFEST} names {name!r} outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume or export, verified: ``resume`` is 'latest' (of ``run_dir``; None when it has
    none), a run directory or its ``checkpoints`` folder (the newest intact one, warning about each damaged
    one skipped), or a ``step_*`` folder (used as named: damage is an error, no fallback)."""
    p = Path(run_dir) if resume == "latest" else Path(resume)
    if p.name.startswith("step_") and p.is_dir():
        problem = verify(p)
        if problem:
            raise CheckpointError(f"{p}: damaged checkpoint: {problem}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    candidates, problems = _candidates(root)
    if not candidates and not problems:
        if resume == "latest":
            return None
        raise CheckpointError(f"{p}: no checkpoint found (expected a run directory, its checkpoints/ folder "
                              "or a step_* folder)")
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            for text in problems:
                warnings.warn(f"{text}; using {ckpt}", stacklevel=2)
            return ckpt
        problems.append(f"{ckpt}: {problem}")
    raise CheckpointError(f"{root}: no intact checkpoint ({'; '.join(problems)})")


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints to try, best first: the one ``latest`` names, then older ones; all of them when
    ``latest`` is unusable (a checkpoint newer than ``latest`` can be from an abandoned branch of the run)."""
    done, latest = _complete(root), root / "latest"
    if not latest.exists():
        return done, ([f"{latest} is missing"] if done else [])
    name = latest.read_text().strip()
    if not name:
        return done, [f"{latest} is empty"]
    named = root / name
    if named not in done:
        return done, [f"{latest} names {name}, which does not exist"]
    return [named, *(p for p in done if p.name < named.name)], []


def step_of(ckpt: Path) -> int:
    """The step a checkpoint folder holds, from its name (``step_00000060``; -1 for another name)."""
    digits = ckpt.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def saved_run(ckpt: Path) -> dict[str, Any] | None:
    """The checkpoint's ``checkpoint.json`` (step, world_size, config), or None for one written without it."""
    path = ckpt / META
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config") or {}, dict):
        raise CheckpointError(f"{path}: expected a mapping with step, world_size and a config mapping")
    return saved


def load(engine: Any, ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns (client, rank_state).
    DeepSpeed's own unpickling is restricted to tensors and its allow-listed state classes."""
    rank, _ = _rank_world()
    try:
        with restricted_unpickling():
            _, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
        what = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"{ckpt}: DeepSpeed cannot load it into this model ({what})") from exc
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    path = ckpt / f"rank_{rank}.json"
    try:
        rank_state = json.loads(path.read_text())
        set_rng_state(rank_state.pop("rng"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: was the checkpoint written with a different world size?") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a valid rank state ({exc})") from None
    return client, rank_state


def prepare_resume(resume: str, run_dir: str | Path) -> Path | None:
    """Rank 0's choice of checkpoint (verified, its pickles scanned), shared with every rank."""

    def choose() -> Path | None:
        ckpt = find(resume, run_dir)
        if ckpt is None:
            print(f"mmpt: --resume {resume}: no checkpoint in {ckpt_root(run_dir)}; starting fresh", flush=True)
        else:
            check_pickles(ckpt)
            _check_rank_states(ckpt)
        return ckpt

    return on_rank0(choose, share=True)


def _check_rank_states(ckpt: Path) -> None:
    """Every ``rank_<r>.json`` parses and holds a loader position and RNG state: a bad one is found here, on
    rank 0 before any rank loads, rather than on its own rank while the others wait in a collective."""
    for path in sorted(ckpt.glob("rank_*.json")):
        try:
            state = json.loads(path.read_text())
            ok = isinstance(state, dict) and {"loader", "rng"} <= state.keys()
        except ValueError:
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: not a valid rank state (expected JSON with 'loader' and 'rng')")
