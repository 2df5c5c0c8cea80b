"""Test helpers for OpenCLIP exports of mmpt's own towers: a briefly trained ``clip-tiny`` (the shipped recipe,
smaller batch and a few steps) and the demo eval split in CLIP_benchmark's ``wds/`` dataset layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from shardkit import read_shards

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "clip-tiny.yaml"


def train_clip_tiny(sources: list[str], run: Path, steps: int = 3, batch_size: int = 32) -> Path:
    """Train the clip-tiny recipe for ``steps`` steps on ``sources`` (its towers, head and objective unchanged);
    returns the run directory."""
    from mmpt.config import load_config, load_yaml
    from mmpt.training.loop import train

    raw: dict[str, Any] = load_yaml(RECIPE)
    raw["data"].update(sources=sources, batch_size=batch_size, workers=1, shuffle_buffer=64)
    raw["optim"]["warmup_steps"] = 1
    raw["train"].update(out_dir=str(run), steps=steps, checkpoint_every=steps, log_every=steps, progress=False)
    raw["eval"] = []
    train(load_config(raw))
    return run


def image_member(members: dict[str, bytes]) -> str:
    """The extension of a sample's image member."""
    return next(ext for ext in ("png", "jpg", "jpeg", "webp") if ext in members)


def write_wds_classification(info: Any, task: str, root: Path) -> Path:
    """The demo eval split as a CLIP_benchmark ``wds/`` zero-shot dataset for ``task`` (colour or shape):
    ``test/0.tar`` (image + ``cls`` index), ``test/nshards.txt``, ``classnames.txt`` and the demo's templates
    with CLIP_benchmark's ``{c}`` slot."""
    classes = info.classes[task].read_text().split()
    templates = [t.replace("{}", "{c}") for t in info.templates[task].read_text().splitlines() if t.strip()]
    (root / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for key, members in read_shards(info.eval_shards):
            image = image_member(members)
            label = str(classes.index(json.loads(members["json"])[task])).encode()
            for ext, data in ((image, members[image]), ("cls", label)):
                entry = tarfile.TarInfo(f"{key}.{ext}")
                entry.size = len(data)
                tar.addfile(entry, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root
