"""Resuming with a changed config: refuse what cannot resume, warn about and record what breaks exactness.

A checkpoint stores the resolved config and world size (``checkpoint.json``); the run directory keeps
``config.yaml`` (the config now in use) and ``configs/config-<start step>.yaml`` (one per start), so
the history of a run's configs survives every resume.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from mmpt.config import Config, dump_config
from mmpt.training import checkpoint

# Keys meant to change between a run and its resume (no warning), and why.
MAY_CHANGE = {
    "name": "a label",
    "train.out_dir": "a run directory may be moved or copied",
    "train.steps": "extending or shortening the run is what a resume is for",
    "train.epochs": "the same, counted in epochs",
    "train.crash_at_step": "fault injection (tests)",
    "train.crash_in_save": "fault injection (tests)",
    "train.progress": "console output only",
    "train.log_every": "log output only",
    "train.log_sample_keys": "log output only",
    "train.checkpoint_every": "when checkpoints are written, not what is trained",
    "train.keep_last": "how many checkpoints are kept",
    "train.eval_every": "evaluation reads the model, never changes it",
    "eval": "the same",
}
# Keys whose change cannot resume at all, and why.
REFUSE = {
    "train.zero_stage": "DeepSpeed lays out optimizer state per ZeRO stage; export the checkpoint and start a "
                        "new run from its weights instead",
    "data.workers": "each data worker's stream position is saved on its own; resume with the same number",
}


def check_resume_config(ckpt: Path, cfg: Config, world: int) -> dict[str, list[Any]]:
    """Compare ``cfg`` and ``world`` with what wrote ``ckpt``: ConfigError for what cannot resume, a warning
    per change that breaks exact resume; returns those changes as ``{key: [old, new]}``."""
    saved = checkpoint.saved_run(ckpt)
    if saved is None:
        warnings.warn(f"{ckpt} stores no config (written by an older mmpt): config changes cannot be checked",
                      stacklevel=2)
        return {}
    if saved.get("world_size") != world:
        raise checkpoint.CheckpointError(
            f"{ckpt} was written by {saved.get('world_size')} rank(s), this run has {world}: each rank's data "
            "position and ZeRO partition are per rank, so resume with the same number of ranks")
    old, new = _flatten(saved.get("config") or {}), _flatten(json.loads(json.dumps(cfg.to_dict(), default=str)))
    changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not _matches(k, MAY_CHANGE)}
    for key, (was, now) in changed.items():
        why = _matches(key, REFUSE)
        if why:
            raise checkpoint.CheckpointError(f"{key}: the checkpoint {ckpt} was written with {was!r}, now {now!r}: "
                                             f"cannot resume ({why})")
    for key, (was, now) in changed.items():
        warnings.warn(f"{key}: {was!r} -> {now!r} since {ckpt.name}: the resumed run is no longer exactly the "
                      "run it continues (recorded in metrics.jsonl and configs/)", stacklevel=2)
    return changed


def write_config_history(run_dir: Path, cfg: Config, start: int) -> None:
    """``config.yaml`` = the config now in use; ``configs/config-<start>.yaml`` keeps every start's config."""
    text = dump_config(cfg)
    (run_dir / "configs").mkdir(parents=True, exist_ok=True)
    (run_dir / "configs" / f"config-{start:08d}.yaml").write_text(text)
    (run_dir / "config.yaml").write_text(text)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, table: dict[str, str]) -> str | None:
    """The reason ``table`` gives for ``key`` or one of its parents."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in table:
            return table[".".join(parts[:i])]
    return None
