"""Test helpers for exports: a tiny trained export, and crafted copies (what an attacker can write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from shardkit import tiny_config


def train_and_export(shards: list[str], root: Path, **encoder_overrides: Any) -> Path:
    """Train a tiny CLIP for one step under ``root`` and export it; returns the .safetensors path."""
    from mmpt.commands.export import export
    from mmpt.config import load_config
    from mmpt.training.loop import train

    raw = tiny_config(shards, root / "run", steps=1, log_sample_keys=False)
    for modality, kwargs in encoder_overrides.items():
        raw["model"]["encoders"][modality].update(kwargs)
    train(load_config(raw))
    return export(root / "run", root / "model.safetensors")


def metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def config_of(path: Path) -> dict[str, Any]:
    """The raw config dict embedded in an export."""
    return yaml.safe_load(metadata(path)["config"])


def rewrite(src: Path, dst: Path, meta: dict[str, str | None] | None = None,
            tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of an export with metadata entries replaced (None: removed) and/or tensors replaced."""
    from safetensors.torch import load_file, save_file

    new = metadata(src)
    for key, value in (meta or {}).items():
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    state = load_file(str(src))
    state.update(tensors or {})
    save_file(state, str(dst), metadata=new)
    return dst


def with_config(src: Path, dst: Path, cfg: dict[str, Any]) -> Path:
    """A copy of an export whose embedded config is ``cfg``."""
    return rewrite(src, dst, {"config": yaml.safe_dump(cfg)})
