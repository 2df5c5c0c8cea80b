"""``mmpt.train``: the Python entry point for training beside ``mmpt.load``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shardkit import fresh_env

import mmpt
from mmpt.config import load_config
from mmpt.registry import ConfigError
from mmpt.training.engine import free_port


def test_train_runs_a_config_with_dotted_overrides_and_returns_the_summary(tiny_cfg: dict, tmp_path: Path) -> None:
    out = tmp_path / "api"
    summary = mmpt.train(tiny_cfg, train__steps=2, train__out_dir=out, optim__lr=5e-4, train__checkpoint_every=2)
    assert summary.steps == 2 and summary.start == 0
    assert Path(summary.run_dir).is_dir() and Path(summary.run_dir).is_relative_to(out)
    assert Path(summary.checkpoint).exists()
    recorded = yaml.safe_load((Path(summary.run_dir) / "config.yaml").read_text())
    assert recorded["train"]["steps"] == 2 and recorded["optim"]["lr"] == 5e-4
    assert tiny_cfg["train"]["steps"] == 8  # the caller's dict is left as it was
    model, _, _ = mmpt.load(summary.run_dir)
    assert model is not None
    # resume="latest" of a finished run has nothing to do and says so in its summary
    again = mmpt.train(load_config(tiny_cfg), resume="latest", train__steps=2, train__out_dir=str(out), optim__lr=5e-4,
                       train__checkpoint_every=2)
    assert again.steps == 2 and again.start == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train__stepz": 2}, "train.stepz: unknown key"),
    ({"train__steps": object()}, "train.steps: object is not a config value"),
])
def test_train_refuses_bad_overrides_before_running(tiny_cfg: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        mmpt.train(tiny_cfg, **overrides)


def test_train_takes_a_recipe_file_and_a_config(tiny_cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A YAML path and a Config reach the loop as the same validated Config (the loop itself is stubbed)."""
    seen = []
    monkeypatch.setattr("mmpt.training.loop.train", lambda cfg, resume=None: seen.append((cfg, resume)) or "ran")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_cfg))
    assert mmpt.train(str(recipe), train__steps=3) == "ran"
    assert mmpt.train(load_config(tiny_cfg), resume="latest", seed=7) == "ran"
    cfg = load_config(tiny_cfg)
    assert mmpt.train(cfg) == "ran" and seen[-1][0] is cfg
    assert seen[0][0].train.steps == 3 and seen[0][1] is None
    assert seen[1][0].seed == 7 and seen[1][1] == "latest"


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
import mmpt

summary = mmpt.train(json.load(open(sys.argv[1])), train__steps=2, train__checkpoint_every=2)
print(f"rank {dist.get_rank()}/{dist.get_world_size()} steps {summary.steps} run {summary.run_dir}", flush=True)
"""


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_under_torchrun_runs_on_every_rank(tiny_cfg: dict, tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_cfg))
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "ranks.py"), str(tmp_path / "cfg.json")]
    proc = subprocess.run(cmd, env=fresh_env(OMP_NUM_THREADS="1", MMPT_DIST_TIMEOUT="120"), capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    run_dir = tiny_cfg["train"]["out_dir"]
    assert [line.split(" run ")[0] for line in lines] == ["rank 0/2 steps 2", "rank 1/2 steps 2"]
    assert all(Path(line.split(" run ")[1]).is_relative_to(run_dir) for line in lines)
    assert (Path(lines[0].split(" run ")[1]) / "config.yaml").exists()
