"""Test helpers for run directories: a small training config, copies of finished runs, and resealing a
checkpoint's manifest after a test edits its files (what an attacker with write access can do)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from shardkit import tiny_config


def small(shards: list[str], out: Path, **kw) -> dict:
    """A tiny config of 4 steps with checkpoints at steps 2 and 4 and one data worker."""
    raw = tiny_config(shards, out, **{"steps": 4, "checkpoint_every": 2, "log_every": 1, **kw})
    raw["data"]["workers"] = 1
    return raw


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of the run directory ``src`` at ``dst``."""
    shutil.copytree(src, dst)
    return dst


def reseal(ckpt: Path) -> None:
    """Recompute manifest.json (if the format has one) so only the checks under test stand in the way."""
    manifest = ckpt / "manifest.json"
    if not manifest.exists():
        return
    data = json.loads(manifest.read_text())
    data["files"] = {name: e for name, e in data["files"].items() if (ckpt / name).exists()}
    for name, entry in data["files"].items():
        blob = (ckpt / name).read_bytes()
        entry.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    manifest.write_text(json.dumps(data))
