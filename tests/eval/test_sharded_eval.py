"""Eval split over ranks: each of two gloo ranks embeds about half, the gathered set and the metrics equal
one rank's eval of the same weights (ZeRO 0 and 3), and the order does not depend on the worker count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpt.training.engine import free_port

HARNESS = Path(__file__).parents[1] / "train" / "_train_ranks.py"


def launch_scenario(scenario: str, shard_dir: Path, out: Path) -> None:
    """One scenario of the two-rank harness (tests/train/_train_ranks.py) under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMPT_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HARNESS), str(shard_dir), str(out), scenario]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def two_ranks(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded_eval")
    launch_scenario("sharded_eval", Path(color_shards[0]).parent, out)
    return out


def one_rank(run: Path, tmp_path: Path):
    """The exported model of a two-rank run, loaded in this single process."""
    import mmpt
    from mmpt.commands.export import export

    pretrainer, transforms, _ = mmpt.load(str(export(run, tmp_path / "model.safetensors")))
    return pretrainer.model, transforms


def test_order_does_not_depend_on_workers(color_shards: list[str], tiny_cfg: dict) -> None:
    """Two workers interleave their shards' batches; the embedded set comes back in shard order anyway."""
    from mmpt.config import load_config
    from mmpt.eval.common import embed_data
    from mmpt.pretrainer import build_data_specs, build_pretrainer

    cfg = load_config(tiny_cfg)
    model, specs = build_pretrainer(cfg).model.eval(), build_data_specs(cfg)
    got = {w: embed_data(model, specs, "::".join(color_shards), 16, progress=False, workers=w) for w in (1, 2)}
    assert got[1].keys == got[2].keys and len(got[1]) == 150
    assert got[1].keys[0].startswith("s0_") and got[1].keys[-1].startswith("s2_")
    torch.testing.assert_close(got[1].embeddings, got[2].embeddings)


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_embed_half_each_and_equal_one_rank(two_ranks: Path, stage: int, tmp_path: Path) -> None:
    from mmpt.eval import run_tasks
    from mmpt.eval.common import embed_data

    reports = [json.loads((two_ranks / f"eval{stage}_rank{r}.json").read_text()) for r in range(2)]
    model, transforms = one_rank(two_ranks / f"eval{stage}", tmp_path)
    expected = run_tasks(model, transforms, reports[0]["tasks"], "cpu", progress=False)
    for r, report in enumerate(reports):
        for name in ("loop", "again"):
            assert sorted(report[name]) == sorted(expected), (r, name)
            for task, metrics in report[name].items():
                want = {k: v for k, v in expected[task].items() if isinstance(v, (int, float))}
                assert metrics == pytest.approx(want, rel=1e-6, abs=1e-9), f"rank {r} {name} {task}"
    # One rank embeds 150 images (zero-shot), 40 images (retrieval) and 4 + 4 prompts/captions: 198 rows.
    # Split, rank 0 takes shards 0 and 2 (100) and 3 of 5 retrieval batches (24), rank 1 the rest; the
    # one-sample padding forwards add a few rows.
    for counted in ("loop_rows", "rows"):  # eval at the end of training, and the same eval again
        rows = [sum(report[counted].values()) for report in reports]
        assert all(n <= 0.7 * 198 for n in rows), (counted, rows)
        assert 198 <= sum(rows) <= 198 + 6, (counted, rows)
    saved = torch.load(two_ranks / f"eval{stage}_embedded.pt")
    shards = reports[0]["tasks"][0]["data"]
    for name, pattern in (("all", shards), ("one", shards.split("::")[0])):
        ref = embed_data(model, transforms, pattern, 8, progress=False)
        assert saved[name]["keys"] == ref.keys and saved[name]["skipped"] == ref.skipped
        torch.testing.assert_close(saved[name]["embeddings"], ref.embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.multirank
def test_a_rank_without_input_is_sent_one_to_pad_with(two_ranks: Path) -> None:
    """ZeRO-3 forwards are collectives: the rank with no forwards of its own runs as many as the busiest."""
    pads = [json.loads((two_ranks / f"pad_rank{r}.json").read_text()) for r in range(2)]
    assert pads[0] == {"items": 2, "calls": []}
    assert pads[1] == {"items": 0, "calls": [[7.0], [7.0]]}
