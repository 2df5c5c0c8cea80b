"""A third-party package adds a modality through the ``mmpt.encoders`` entry point group: ``mmpt info``
lists it and a training step runs with it, with no edit to mmpt.

The package is generated in a temporary folder with a ``*.dist-info/entry_points.txt``, the record
pip writes for an installed package, so ``importlib.metadata`` finds it on ``PYTHONPATH`` (a
subprocess: the shared venv stays untouched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml
from shardkit import fresh_env, write_tar

PLUGIN = '''
"""A toy third-party modality: 'toy' members hold 8 float32 features; one linear layer encodes them."""

import numpy as np
import torch
from torch import nn

from mmpt.contracts import Encoder, EncoderOutput, ModalityData
from mmpt.nn.token_encoder import stack_present
from mmpt.registry import encoders, modalities


@modalities.register("toy")
class ToyData(ModalityData):
    modality = "toy"
    extensions = ("toy",)

    def decode(self, data, ext):
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())

    def collate(self, values):
        return {"x": stack_present(values)}


@encoders.register("toy/linear")
class ToyEncoder(Encoder):
    """A linear toy tower.

    width: output width.
    """

    modality = "toy"

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.proj = nn.Linear(8, width)

    def forward(self, inputs):
        tokens = self.proj(inputs["x"]).unsqueeze(1)
        return EncoderOutput(tokens=tokens, mask=None, pooled=tokens[:, 0])
'''


def toy_recipe(sources: list[str], run_dir: Path, batch_size: int) -> dict:
    """A one-step recipe contrasting the plugin's toy modality with text."""
    return {
        "name": "toy-plugin", "seed": 0,
        "model": {"embed_dim": 16, "encoders": {
            "toy": {"name": "toy/linear", "width": 16},
            "text": {"name": "text/transformer", "context_length": 8, "width": 16, "depth": 1, "heads": 2}}},
        "objectives": {"clip": {"name": "clip", "pairs": [["toy", "text"]]}},
        "data": {"sources": sources, "batch_size": batch_size, "workers": 0, "shuffle_buffer": 0,
                 "required": ["toy", "text"]},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"out_dir": str(run_dir), "steps": 1, "log_every": 1, "checkpoint_every": 1,
                  "progress": False, "eval_every": 0},
    }


def make_plugin(site: Path) -> None:
    """The package and the dist-info record ``pip install`` would leave behind."""
    (site / "mmpt_toy_plugin").mkdir(parents=True)
    (site / "mmpt_toy_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "mmpt_toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmpt-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmpt.encoders]\ntoy = mmpt_toy_plugin\n")


def test_plugin_package_registers_a_modality_and_trains(tmp_path: Path) -> None:
    site = tmp_path / "site"
    make_plugin(site)
    rng = np.random.default_rng(0)
    samples = [(f"s{i:03d}", {"toy": rng.normal(size=8).astype(np.float32).tobytes(),
                              "txt": f"sample number {i % 5}".encode()}) for i in range(16)]
    shard = write_tar(tmp_path / "toy-000.tar", samples)
    recipe = toy_recipe([shard], tmp_path / "run", batch_size=8)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(recipe))
    script = textwrap.dedent(f"""
        import sys
        from mmpt.cli import main
        main(["info"])
        sys.exit(main(["train", {str(tmp_path / 'toy.yaml')!r}]))
    """)
    env = fresh_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines() if line.strip()}
    assert "toy/linear" in listed["encoders"] and "toy" in listed["modalities"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 1 and isinstance(r.get("loss"), float) for r in steps), steps


def guide_files() -> dict[str, str]:
    """The files docs/add_a_modality.md adds: each code block marked ``<!-- file: PATH -->``."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "add_a_modality.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))


def test_add_a_modality_guide_runs(tmp_path: Path) -> None:
    """The guide's modality file, recipe and tests, as written there: demo data, two training steps,
    zero-shot eval of the new modality against text prompts, and the guide's own tests."""
    files = guide_files()
    assert set(files) == {"encoders/time_series.py", "recipes/ts-clip-tiny.yaml", "tests/encoders/test_time_series.py"}
    site = tmp_path / "site"
    site.mkdir()
    # the guide's encoders/ file, registered the way a package would be (the shared tree stays untouched)
    (site / "guide_time_series.py").write_text(files["encoders/time_series.py"])
    (site / "guide_ts-0.1.dist-info").mkdir()
    (site / "guide_ts-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: guide-ts\nVersion: 0.1\n")
    (site / "guide_ts-0.1.dist-info" / "entry_points.txt").write_text("[mmpt.encoders]\nts = guide_time_series\n")
    recipe, tests = tmp_path / "ts-clip-tiny.yaml", tmp_path / "test_time_series.py"
    recipe.write_text(files["recipes/ts-clip-tiny.yaml"])
    tests.write_text(files["tests/encoders/test_time_series.py"])
    run, results = tmp_path / "run", tmp_path / "results.json"
    script = textwrap.dedent(f"""
        import sys
        import pytest
        from mmpt.cli import main
        steps = [
            ["data", "demo", "--out", {str(tmp_path / 'data')!r}, "--train-samples", "256", "--eval-samples", "64",
             "--modalities", "text,time_series"],
            ["train", {str(recipe)!r}, "--set", "train.steps=2", "--set", "data.batch_size=32",
             "--set", "data.shuffle_buffer=0", "--set", "data.workers=0", "--set", "optim.warmup_steps=1",
             "--set", "train.checkpoint_every=2", "--set", "train.progress=false", "--set", "train.eval_every=0"],
            ["eval", {str(run)!r}, "--tasks-file", {str(recipe)!r}, "--out", {str(results)!r}],
        ]
        for argv in steps:
            if main(argv):
                sys.exit(f"failed: mmpt {{' '.join(argv)}}")
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {str(tests)!r}]))
    """)
    env = fresh_env(MMPT_DEMO_DATA=str(tmp_path / "data"), MMPT_RUN_DIR=str(run),
                    PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180,
                         cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    scores = json.loads(results.read_text())
    assert {"zero_shot/shape", "zero_shot/color"} <= scores.keys()
    assert scores["zero_shot/shape"]["n"] > 40 and scores["zero_shot/shape"]["num_classes"] == 8
    assert "4 passed" in out.stdout
