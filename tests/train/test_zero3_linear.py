"""ZeRO-3 keeps torch's own ``nn.Linear``: DeepSpeed's ``zero.Init`` would otherwise swap
``torch.nn.functional.linear`` process-wide for its ``LinearFunctionForZeroStage3`` (``memory_efficient_linear``),
which under bf16 autocast rounds ``x @ W.T`` to bf16 before adding the bias. ZeRO-3 forwards then drifted from
stage 0's as soon as biases left zero (2-rank cleanclip/itm losses ~1e-4 apart from step 2), and every later
``nn.Linear`` in the process, at any stage, computed that way."""

from __future__ import annotations

import torch
from _zero_init_cases import cases
from torch import nn


def bf16_linear_output() -> torch.Tensor:
    """A (2, 5, 16) batch through a Linear with a non-zero bias under CPU bf16 autocast."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 24)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 16, generator=gen))
        layer.bias.copy_(torch.randn(24, generator=gen) * 3)
    x = torch.randn(2, 5, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x).float()


def test_zero3_build_leaves_torch_linear_alone() -> None:
    from mmpt.config import load_config
    from mmpt.parts.build import build_module
    from mmpt.pretrainer import build_pretrainer
    from mmpt.training.engine import deepspeed_config, init_distributed

    assert torch.nn.functional.linear is torch._C._nn.linear, "an earlier test left F.linear swapped"
    want = bf16_linear_output()
    cfg = load_config(cases()["clip#0"])
    cfg.train.zero_stage = 3
    d = init_distributed()
    ds = deepspeed_config(cfg, d.world)
    build_module(lambda on_part: build_pretrainer(cfg, on_part), ds, d.device)
    assert ds["zero_optimization"]["memory_efficient_linear"] is False
    assert torch.nn.functional.linear is torch._C._nn.linear, torch.nn.functional.linear
    assert torch.equal(bf16_linear_output(), want)
