"""distill: contrastive KD against OpenCLIP's DistillClipLoss, masking against dropping the rows, and a student
trained from a frozen teacher export that checkpoints, exports and reloads without the teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shardkit import tiny_config

from mmpt.objectives.contrastive import GatherMode
from mmpt.objectives.distill import contrastive_kd, feature_distance
from mmpt.registry import ConfigError

LOCAL = GatherMode("local")


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_kd_equals_openclip_distill_clip_loss() -> None:
    from open_clip.loss import DistillClipLoss

    a, b, ta, tb = unit(12, 16, seed=0), unit(12, 16, seed=1), unit(12, 24, seed=2), unit(12, 24, seed=3)
    scale, tscale = torch.tensor(14.0), torch.tensor(60.0)
    want = DistillClipLoss()(a, b, scale, ta, tb, tscale, output_dict=True)["distill_loss"]
    got = contrastive_kd(a, b, scale, ta, tb, tscale, gather=LOCAL)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_kd_with_absent_samples_equals_the_batch_without_them() -> None:
    a, b, ta, tb = unit(10, 8, seed=4), unit(10, 8, seed=5), unit(10, 8, seed=6), unit(10, 8, seed=7)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    scale, tscale = torch.tensor(10.0), torch.tensor(30.0)
    got = contrastive_kd(a, b, scale, ta, tb, tscale, gather=LOCAL, valid=valid)
    want = contrastive_kd(a[valid], b[valid], scale, ta[valid], tb[valid], tscale, gather=LOCAL)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # a naive loop: per row, cross-entropy between the two softmaxes over the valid columns
    rows = []
    for i in range(len(a)):
        if not valid[i]:
            continue
        for x, y, tx, ty in ((a, b, ta, tb), (b, a, tb, ta)):
            s = torch.stack([scale * x[i] @ y[j] for j in range(len(a)) if valid[j]])
            t = torch.stack([tscale * tx[i] @ ty[j] for j in range(len(a)) if valid[j]])
            rows.append(-(t.softmax(0) * s.log_softmax(0)).sum())
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_feature_distance_is_the_mean_cosine_distance_over_valid_rows() -> None:
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    want = sum(1 - F.cosine_similarity(s[i], t[i], dim=0) for i in range(6) if valid[i]) / int(valid.sum())
    assert feature_distance(s, t, valid).item() == pytest.approx(float(want), rel=1e-6)


def test_unit_checks_name_the_key() -> None:
    from mmpt.objectives.distill import Distill

    with pytest.raises(ConfigError, match="teacher_weights"):
        Distill(pairs=[["image", "text"]], teacher_weights=[1.0])
    with pytest.raises(ConfigError, match="kd_weight"):
        Distill(pairs=[["image", "text"]], kd_weight=0, feature_weight=0)


@pytest.fixture(scope="module")
def teacher(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exportkit import train_and_export

    return train_and_export(color_shards, tmp_path_factory.mktemp("teacher"))


def student_config(shards: list[str], out: Path, teacher: Path, **distill) -> dict:
    raw = tiny_config(shards, out, steps=4, checkpoint_every=2, log_sample_keys=False)
    raw["model"]["encoders"]["image"]["width"] = 16  # a half-width student
    raw["model"]["encoders"]["text"]["width"] = 16
    raw["objectives"]["distill"] = {"name": "distill", "teachers": [str(teacher)], "pairs": [["image", "text"]],
                                    "feature_weight": 0.5, **distill}
    return raw


def test_student_trains_from_a_frozen_teacher_and_exports_without_it(color_shards: list[str], teacher: Path,
                                                                     tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import mmpt
    from mmpt.commands.export import export
    from mmpt.config import load_config
    from mmpt.training.loop import train

    summary = train(load_config(student_config(color_shards, tmp_path / "run", teacher)))
    module = summary.engine.module
    distill = module.objectives["distill"]
    # the teacher's scale is its own clip objective's, and its weights did not move
    want_scale = load_file(str(teacher))["objectives.clip.logit_scale"].exp().item()
    assert distill.teacher_scales[0, 0].item() == pytest.approx(want_scale, rel=1e-6)
    teacher_state = {k.removeprefix("model."): v for k, v in load_file(str(teacher)).items() if k.startswith("model.")}
    for name, p in distill.teachers[0].named_parameters():
        assert not p.requires_grad and torch.equal(p.detach(), teacher_state[name]), name
    assert not distill.teachers[0].training
    assert not any(".teachers." in k for k in module.state_dict())
    out = export(tmp_path / "run", tmp_path / "student.safetensors")
    keys = set(load_file(str(out)))
    assert "objectives.distill.logit_scale" in keys and not any("teachers" in k for k in keys)
    model, _, _ = mmpt.load(str(out))  # rebuilt without reading the teacher's file
    assert len(model.objectives["distill"].teachers) == 0
    assert model.model.encoders["image"].width == 16
    # resuming the run finds the teacher again and the checkpoint complete
    raw = student_config(color_shards, tmp_path / "run", teacher)
    raw["train"]["steps"] = 6
    resumed = train(load_config(raw), resume="latest")
    assert (resumed.start, resumed.steps) == (4, 6)


def test_a_missing_teacher_file_is_named(color_shards: list[str], tmp_path: Path) -> None:
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    cfg = load_config(student_config(color_shards, tmp_path / "run", tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match=r"objectives\.distill\.teachers\[0\].*nope\.safetensors"):
        build_pretrainer(cfg)


def test_teacher_scale_falls_back_to_the_key(teacher: Path) -> None:
    from mmpt.objectives.distill import teacher_logit_scale
    from mmpt.parts.checked_load import load_export_file
    from mmpt.pretrainer import build_pretrainer

    model = load_export_file(teacher, build_pretrainer)
    assert math.isclose(teacher_logit_scale(model, ("text", "image"), "x"),
                        model.objectives["clip"].logit_scale.exp().item(), rel_tol=1e-6)
    with pytest.raises(ConfigError, match="teacher_logit_scale"):
        teacher_logit_scale(model, ("image", "audio"), "distill.teachers[0]")
