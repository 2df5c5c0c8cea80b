"""One-rank training: fault-injected resume is bitwise equal; crash inside a save keeps the previous
checkpoint; optimizer groups follow the no-decay and lr-scale rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.training.checkpoint import InjectedFault
from mmpt.training.engine import param_groups
from mmpt.training.loop import train


def step_log(run_dir: str | Path) -> dict[tuple[int, int], tuple[list[str], float]]:
    """(step, micro) -> (keys, loss); a resumed run's records replace the crashed run's."""
    out = {}
    for line in open(Path(run_dir) / "keys_rank0.jsonl"):
        r = json.loads(line)
        out[(r["step"], r["micro"])] = (r["keys"], r["loss"])
    return out


@pytest.fixture(scope="module")
def reference_run(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(load_config(tiny_config(color_shards, out, grad_accum=2)))
    assert summary.steps == 8 and Path(summary.checkpoint).name == "step_00000008"
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists() and any((out / "tensorboard").iterdir())
    return out


def test_resume_after_crash_is_bitwise_equal(reference_run: Path, color_shards: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        train(load_config(tiny_config(color_shards, out, grad_accum=2, crash_at_step=5)))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    train(load_config(tiny_config(color_shards, out, grad_accum=2)), resume="latest")
    ref, got = step_log(reference_run), step_log(out)
    assert sorted(ref) == sorted(got) and len(ref) == 16
    for k in ref:
        assert got[k][0] == ref[k][0], f"keys differ at {k}"
        assert got[k][1] == ref[k][1], f"loss differs at {k}: {got[k][1]} vs {ref[k][1]}"


def test_crash_inside_save_keeps_previous_checkpoint(reference_run: Path, color_shards: list[str],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(InjectedFault, match="inside the save"):
        train(load_config(tiny_config(color_shards, out, grad_accum=2, crash_in_save=6)))
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000003"
    assert (root / "step_00000006.tmp").is_dir() and not (root / "step_00000006").exists()
    train(load_config(tiny_config(color_shards, out, grad_accum=2)), resume=str(out))
    assert not (root / "step_00000006.tmp").exists()
    ref, got = step_log(reference_run), step_log(out)
    assert all(got[k] == ref[k] for k in ref)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert metrics[-1]["kind"] == "summary" and "done: 5 steps (3->8)" in metrics[-1]["summary"]
    logged = [m for m in metrics if m["kind"] == "train"]
    assert {"loss", "loss/clip", "lr", "samples_per_s", "data_wait", "clip/image_text/logit_scale"} <= set(logged[-1])


def test_param_groups_follow_decay_and_lr_rules(color_shards: list[str], tmp_path: Path) -> None:
    from mmpt.pretrainer import build_pretrainer
    from mmpt.registry import ConfigError

    raw = tiny_config(color_shards, tmp_path)
    raw["optim"]["lr_scale"] = {"model.encoders.text": 0.5}
    cfg = load_config(raw)
    module = build_pretrainer(cfg)
    groups = param_groups(module, cfg)
    names = {id(p): n for n, p in module.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim < 2 or "logit_scale" in n or n.endswith(("pos_embed", "cls_token", "token_embed.weight"))
            assert (g["weight_decay"] == 0) == no_decay, n
            assert g["lr"] == pytest.approx(cfg.optim.lr * (0.5 if n.startswith("model.encoders.text") else 1.0)), n
    raw["optim"]["lr_scale"] = {"model.encoders.txt": 0.5}
    with pytest.raises(ConfigError, match="matches no parameter"):
        param_groups(module, load_config(raw))


def test_periodic_eval_and_offload(color_shards: list[str], tmp_path: Path) -> None:
    """Eval runs inside training and is logged; ZeRO-2 with optimizer offload trains on CPU."""
    out = tmp_path / "run"
    raw = tiny_config(color_shards, out, steps=4, eval_every=2, zero_stage=2, offload_optimizer=True,
                      log_sample_keys=False)
    raw["eval"] = [{"name": "zero_shot", "data": color_shards[0], "label_key": "color",
                    "classnames": ["red", "green", "blue", "yellow"], "templates": ["a {} square"]},
                   {"name": "retrieval", "data": color_shards[0]}]
    summary = train(load_config(raw))
    assert set(summary.eval) == {"zero_shot/color", "retrieval"}
    assert 0 <= summary.eval["zero_shot/color"]["top1"] <= 1
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval/zero_shot/color"]
    assert [r["step"] for r in evals] == [2, 4] and "top1" in evals[0]
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_eval_list_runs_at_the_end_by_default_and_prints(color_shards: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """No train.eval_every: a recipe's eval list runs once, at the end; the table prints on the console,
    the one-line summary carries the headline metrics, loss.png gets the eval panel."""
    out = tmp_path / "run"
    raw = tiny_config(color_shards, out, steps=3, checkpoint_every=3, log_sample_keys=False)
    raw["eval"] = [{"name": "zero_shot", "data": color_shards[0], "label_key": "color",
                    "classnames": ["red", "green", "blue", "yellow"], "templates": ["a {} square"]}]
    summary = train(load_config(raw))
    printed = capsys.readouterr().out
    assert "eval at step 3:" in printed and "zero_shot/color  top1" in printed
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "eval/zero_shot/color"] == [3]
    assert f"zero_shot/color top1 {summary.eval['zero_shot/color']['top1']:.3f}" in str(summary)
    train(load_config({**raw, "train": {**raw["train"], "out_dir": str(tmp_path / "never"), "eval_every": 0}}))
    assert not [r for r in map(json.loads, open(tmp_path / "never" / "metrics.jsonl")) if r["kind"].startswith("eval/")]
