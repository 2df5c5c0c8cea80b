"""CleanCLIP: the two-view data sides, the in-modality loss and the whole objective against a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpt.config import load_config
from mmpt.data.views import Views, view_count, view_fields
from mmpt.objectives.cleanclip import inmodal_loss
from mmpt.objectives.contrastive import GatherMode
from mmpt.pretrainer import build_data_specs, build_pretrainer
from mmpt.registry import ConfigError, modalities


def test_data_sides_make_two_views() -> None:
    image = modalities.get("image")(image_size=16, train_views=2)
    pic = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    views = image.transform(pic, train=True)
    assert isinstance(views, Views) and len(views) == 2 and views[0].shape == views[1].shape == (3, 16, 16)
    assert not isinstance(image.transform(pic, train=False), Views)  # eval: one view
    fields = image.collate([views, None, image.transform(pic, train=True)])
    assert set(fields) == {"pixels", "pixels@view1"} and view_count(fields) == 2
    assert torch.equal(view_fields(fields, 1)["pixels"][0], views[1]) and not fields["pixels@view1"][1].any()
    text = modalities.get("text")(context_length=16, train_views=2, view_word_drop=0.3)
    caps = [text.transform("a small red star on the left", train=True) for _ in range(20)]
    assert all(c[0] == "a small red star on the left" for c in caps) and any(c[1] != c[0] for c in caps)
    assert all(set(c[1].split()) <= set(c[0].split()) for c in caps)
    assert set(text.collate(caps)) == {"ids", "mask", "ids@view1", "mask@view1"}
    with pytest.raises(ValueError, match="train_views"):
        modalities.get("image")(train_views=0)


def naive_inmodal(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    total = 0.0
    for i in range(len(a)):
        logits = [scale * float(a[i] @ b[j]) for j in range(len(b))]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(a)


def test_inmodal_loss_matches_naive_loop() -> None:
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    loss, m = inmodal_loss(a, b, torch.tensor([10.0]), gather=GatherMode("local"))
    assert loss.item() == pytest.approx(naive_inmodal(a, b, 10.0), rel=1e-5)
    valid = torch.tensor([True, True, False, True, True, True])
    loss, _ = inmodal_loss(a, b, torch.tensor([10.0]), gather=GatherMode("local"), valid=valid)
    assert loss.item() == pytest.approx(naive_inmodal(a[valid], b[valid], 10.0), rel=1e-5)


def test_cleanclip_objective_matches_reference(tiny_cfg: dict) -> None:
    """λ1 · CLIP(image, text) + λ2 · mean(SS(image), SS(text)), every view encoded by the same towers."""
    for m in ("image", "text"):
        tiny_cfg["model"]["encoders"][m]["train_views"] = 2
    tiny_cfg["objectives"] = {"clip": {"name": "cleanclip", "pairs": [["image", "text"]], "init_logit_scale": 10.0,
                                       "clip_weight": 0.7, "inmodal_weight": 1.3}}
    cfg = load_config(tiny_cfg)
    torch.manual_seed(0)
    pre = build_pretrainer(cfg)
    specs = build_data_specs(cfg)
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    caps = ["a red circle", "a blue square on a background", "a green star", "a ring", "a pink cross at the top"]
    from mmpt.contracts import Batch

    fields = {"image": specs["image"].collate([specs["image"].transform(p, True) for p in pics]),
              "text": specs["text"].collate([specs["text"].transform(c, True) for c in caps])}
    batch = Batch(fields=fields, present={m: torch.ones(5, dtype=torch.bool) for m in fields}, keys=list("abcde"))
    out = pre(batch)
    emb = {m: {k: pre.model.encode_fields(m, view_fields(fields[m], k)).embedding for k in (0, 1)} for m in fields}
    scale = 10.0
    logits = scale * emb["image"][0] @ emb["text"][0].T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    ss = [naive_inmodal(emb[m][0].detach(), emb[m][1].detach(), scale) for m in ("image", "text")]
    want = 0.7 * clip.item() + 1.3 * sum(ss) / 2
    assert out["loss"].item() == pytest.approx(want, rel=1e-4)
    assert out["metrics"]["clip/image_inmodal/loss"].item() == pytest.approx(ss[0], rel=1e-4)
    out["loss"].backward()
    assert pre.model.encoders["image"].patch_embed.weight.grad.abs().sum() > 0


def test_cleanclip_without_views_says_how(tiny_cfg: dict) -> None:
    tiny_cfg["objectives"] = {"clip": {"name": "cleanclip", "pairs": [["image", "text"]]}}
    cfg = load_config(tiny_cfg)
    pre, specs = build_pretrainer(cfg), build_data_specs(cfg)
    from mmpt.contracts import Batch

    fields = {"image": specs["image"].collate([specs["image"].transform(np.zeros((32, 32, 3), np.uint8), True)] * 2),
              "text": specs["text"].collate(["a", "b"])}
    with pytest.raises(ConfigError, match="set train_views: 2 in model.encoders.image"):
        pre(Batch(fields=fields, present={m: torch.ones(2, dtype=torch.bool) for m in fields}, keys=["a", "b"]))
