"""Fixtures of the interop tests: a briefly trained clip-tiny on the demo data (shared by the OpenCLIP export and
CLIP_benchmark tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class ClipTiny:
    """A clip-tiny run on the demo data, its mmpt export and the demo's ``DemoInfo``."""

    run: Path
    export: Path
    demo: Any


@pytest.fixture(scope="session")
def clip_tiny(tmp_path_factory: pytest.TempPathFactory) -> ClipTiny:
    """clip-tiny (the shipped recipe's towers, head and objective) trained 3 steps of 32 on a small demo set
    (256 training samples; 300 eval samples, 64 px as ``mmpt demo`` writes them)."""
    from clipbenchkit import train_clip_tiny

    from mmpt.commands.export import export
    from mmpt.data.demo_shards import generate_demo

    root = tmp_path_factory.mktemp("clip_tiny")
    demo = generate_demo(root / "demo", train_samples=256, eval_samples=300, shard_size=300, progress=False)
    run = train_clip_tiny([str(p) for p in demo.train_shards], root / "run")
    return ClipTiny(run=run, export=export(run, root / "model.safetensors"), demo=demo)
