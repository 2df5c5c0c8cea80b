"""Similarity losses compute their logits in fp32 even when called inside the towers' bf16 autocast region
(objectives that run a tower themselves, ``uses_model``, call them there): the same value as without autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpt.objectives.cleanclip import inmodal_loss
from mmpt.objectives.contrastive import GatherMode, clip_loss
from mmpt.objectives.distill import contrastive_kd
from mmpt.objectives.matching import momentum_itc_loss
from mmpt.objectives.siglip import siglip_loss

LOCAL = GatherMode("local")


def unit(seed: int, n: int = 12, d: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


CASES = {
    "clip": lambda a, b: clip_loss(a, b, torch.tensor(50.0), gather=LOCAL)[0],
    "siglip": lambda a, b: siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0))[0],
    "itc_momentum": lambda a, b: momentum_itc_loss(a, b, a.flip(0), b.flip(0), unit(8, 5), unit(9, 5),
                                                   torch.tensor(50.0), 0.4)[0],
    "distill": lambda a, b: contrastive_kd(a, b, torch.tensor(20.0), a.flip(0), b.flip(0), torch.tensor(60.0),
                                           gather=LOCAL),
    "cleanclip": lambda a, b: inmodal_loss(a, b, torch.tensor(50.0), gather=LOCAL)[0],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_is_fp32_inside_bf16_autocast(name: str) -> None:
    a, b = unit(0), unit(1)
    want = CASES[name](a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CASES[name](a, b)
    assert got.dtype == torch.float32 and got.item() == want.item(), (got.item(), want.item())
