"""siglip2-tiny's additions (objectives/self_distill.py): the EMA teacher against a naive loop (once per optimizer
step, copied at the first forward, never trained), SILC and TIPS against naive per-row references, the teacher in
checkpoints but not in exports, and an interrupted run resuming to the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shardkit import tiny_config

from mmpt.objectives.self_distill import EMATeacher, SelfDistill, ema_update_, silc_loss, tips_loss
from mmpt.registry import ConfigError

SELF_DISTILL = {"name": "self_distill", "modality": "image", "width": 32, "embed_dim": 32, "momentum": 0.9,
                "prototypes": 16, "head_hidden": 16, "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}


def siglip2_config(shards: list[str], out: Path, **train) -> dict:
    """The tiny config as siglip2-tiny: siglip + caption + self_distill, two local crops per image."""
    raw = tiny_config(shards, out, **train)
    raw["model"]["encoders"]["image"].update(train_views=3, view_crop_scale=[0.1, 0.4])
    raw["objectives"] = {"siglip": {"name": "siglip", "pairs": [["image", "text"]]},
                         "caption": {"name": "caption", "context_length": 16, "width": 32, "depth": 1, "heads": 2,
                                     "memory_width": 32},
                         "self_distill": dict(SELF_DISTILL)}
    return raw


def test_ema_update_equals_a_naive_loop() -> None:
    torch.manual_seed(0)
    student, ema = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)), torch.nn.Linear(4, 3)
    ema = torch.nn.Sequential(ema, torch.nn.LayerNorm(3))
    want = {n: p.detach().clone() for n, p in ema.named_parameters()}
    for m in (0.9, 0.5):
        ema_update_(ema, student, m)
        for n, p in student.named_parameters():
            want[n] = m * want[n] + (1 - m) * p.detach()
    for n, p in ema.named_parameters():
        assert torch.allclose(p, want[n], atol=1e-7), n
    ema_update_(ema, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), student.parameters(), strict=True))


def test_ema_update_refuses_a_different_layout() -> None:
    with pytest.raises(ConfigError, match="does not match"):
        ema_update_(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4), 0.9)


@pytest.mark.parametrize("micro", [1, 3])
def test_teacher_moves_once_per_optimizer_step(micro: int) -> None:
    """Copy at the first forward, then one EMA update per step at its last micro-batch, with that step's weights
    (the teacher of step t is the EMA of the student at steps 0..t-1)."""
    torch.manual_seed(1)
    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher({"w": torch.nn.Linear(3, 2)}, momentum=0.8, micro_batches=micro)
    naive, seen = None, []
    for step in range(4):
        for _ in range(micro):
            teacher.start({"w": student})
            naive = student.weight.detach().clone() if naive is None else naive
            seen.append(teacher.parts["w"].weight.detach().clone())
            assert torch.allclose(seen[-1], naive, atol=1e-7)
            teacher.after_forward({"w": student})
        if step >= 1:
            naive = 0.8 * naive + 0.2 * student.weight.detach()
        with torch.no_grad():
            student.weight.add_(torch.randn_like(student.weight))  # the optimizer step
    assert int(teacher.updates) == 4 and int(teacher.forwards) == 4 * micro
    assert not any(p.requires_grad for p in teacher.parameters())


def test_silc_equals_a_naive_per_row_loop() -> None:
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(5, 7, generator=g) for _ in range(2)]
    teacher, center = torch.randn(5, 7, generator=g), torch.randn(1, 7, generator=g)
    valid = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    got = silc_loss(views, teacher, center, 0.1, 0.04, valid)
    terms = []
    for s in views:
        rows = []
        for i in range(5):
            if not valid[i]:
                continue
            t = torch.exp((teacher[i] - center[0]) / 0.04)
            t = t / t.sum()
            log_p = s[i] / 0.1 - torch.logsumexp(s[i] / 0.1, 0)
            rows.append(-(t * log_p).sum())
        terms.append(torch.stack(rows).mean())
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_tips_equals_a_naive_loop_over_dropped_patches() -> None:
    g = torch.Generator().manual_seed(3)
    pred, teacher = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    weight = (torch.rand(3, 6, generator=g) > 0.5).float()
    weight[1] = 0  # an absent sample
    want = [1 - F.cosine_similarity(pred[b, n], teacher[b, n], dim=0) for b in range(3) for n in range(6)
            if weight[b, n]]
    assert tips_loss(pred, teacher, weight).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="local_weight"):
        SelfDistill(local_weight=0, masked_weight=0)
    with pytest.raises(ConfigError, match="mask_ratio"):
        SelfDistill(mask_ratio=1.0)


@pytest.mark.slow
def test_siglip2_trains_checkpoints_the_teacher_and_exports_without_it(color_shards: list[str],
                                                                       tmp_path: Path) -> None:
    """The recipe's mix trains; the teacher never takes a gradient, equals the EMA of the student's weights at the
    logged steps, is in the checkpoint and not in the export, and an export loads back."""
    from safetensors.torch import load_file

    import mmpt
    from mmpt.commands.export import export
    from mmpt.config import load_config
    from mmpt.training.loop import train

    summary = train(load_config(siglip2_config(color_shards, tmp_path / "run", steps=4, checkpoint_every=2)))
    module = summary.engine.module
    sd = module.objectives["self_distill"]
    assert int(sd.teacher.updates) == 4 and int(sd.teacher.forwards) == 4  # a copy + steps 1..3
    assert all(p.grad is None and not p.requires_grad for p in sd.teacher.parameters())
    tower = dict(module.model.encoders["image"].named_parameters())
    moved = [n for n, p in sd.teacher.parts["tower"].named_parameters() if not torch.equal(p, tower[n])]
    assert moved  # an average of several steps' weights, not the current student
    assert any(".teacher." in k for k in module.state_dict())
    out = export(tmp_path / "run", tmp_path / "model.safetensors")
    keys = set(load_file(str(out)))
    assert "objectives.self_distill.proj.0.weight" in keys and not any(".teacher." in k for k in keys)
    model, _, _ = mmpt.load(str(out))
    assert int(model.objectives["self_distill"].teacher.updates) == 0  # restarts from the student if trained on


@pytest.mark.slow
def test_siglip2_resume_gives_the_same_losses(color_shards: list[str], tmp_path: Path) -> None:
    """Crash after step 3 (checkpoint at 2), resume: every step's loss equals the uninterrupted run's."""
    from mmpt.config import load_config
    from mmpt.training.checkpoint import InjectedFault
    from mmpt.training.loop import train

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, open(run / "keys_rank0.jsonl"))}

    ref = siglip2_config(color_shards, tmp_path / "ref", steps=5, checkpoint_every=2)
    train(load_config(ref))
    raw = siglip2_config(color_shards, tmp_path / "res", steps=5, checkpoint_every=2)
    with pytest.raises(InjectedFault):
        train(load_config({**raw, "train": {**raw["train"], "crash_at_step": 3}}))
    resumed = train(load_config(raw), resume="latest")
    assert resumed.start == 2
    assert losses(tmp_path / "res") == losses(tmp_path / "ref")
