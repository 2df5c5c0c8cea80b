"""Shared fixtures: tiny shards written on the fly and a tiny CLIP config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MMPT_DIST_TIMEOUT", "120")
sys.path.insert(0, str(Path(__file__).parent))

from shardkit import tiny_config, write_color_shards  # noqa: E402


@pytest.fixture(scope="session")
def color_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three uneven shards (40, 50, 60 samples) of coloured squares with captions and json labels."""
    root = tmp_path_factory.mktemp("shards")
    return write_color_shards(root, counts=(40, 50, 60))


@pytest.fixture()
def tiny_cfg(color_shards: list[str], tmp_path: Path) -> dict:
    """A raw config dict of a tiny CLIP on ``color_shards`` writing into tmp_path."""
    return tiny_config(color_shards, tmp_path / "run")
