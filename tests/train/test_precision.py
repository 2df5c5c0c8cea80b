"""train.precision: 'auto' is bf16 autocast (fp32 weights) where bf16 is native, fp32 elsewhere (the CPU/GPU
capability is mocked here); the losses are computed in fp32; bf16 training tracks fp32 within a stated bound."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mmpt
from mmpt.config import load_config
from mmpt.data.loader import train_loader
from mmpt.pretrainer import build_data_specs, build_pretrainer, to_fp32
from mmpt.registry import ConfigError
from mmpt.training.engine import deepspeed_config, resolve_precision, with_resolved_precision


def cpu_has(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool) -> None:
    """Mock torch's CPU feature probes (the only capability check behind 'auto' on a CPU)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"),
                         [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")])
def test_auto_on_a_cpu_is_bf16_only_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool,
                                                          amx: bool, want: str) -> None:
    cpu_has(monkeypatch, avx512_bf16, amx)
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("fp32", "cpu") == "fp32"  # the way out, whatever the CPU


@pytest.mark.parametrize(("bf16", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_or_fp16_on_older_cards(monkeypatch: pytest.MonkeyPatch, bf16: bool, want: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "cuda") == want
    assert resolve_precision("auto") == want  # no device given: CUDA when present


def test_bf16_on_a_cpu_without_native_bf16_warns_and_fp16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_has(monkeypatch, False, False)
    with pytest.warns(UserWarning, match="without native bfloat16.*emulated.*fp32"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    cpu_has(monkeypatch, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu") == "bf16"  # native: no warning


def test_the_run_config_records_what_auto_chose_and_deepspeed_keeps_fp32_weights(
        monkeypatch: pytest.MonkeyPatch, tiny_cfg: dict) -> None:
    cfg = load_config(tiny_cfg)
    cpu = torch.device("cpu")
    cpu_has(monkeypatch, True, False)
    resolved, words = with_resolved_precision(cfg, cpu)
    assert cfg.train.precision == "auto" and resolved.train.precision == "bf16"
    assert words == "bf16 autocast, fp32 weights (auto: native bf16 on this CPU; train.precision=fp32 turns it off)"
    ds = deepspeed_config(resolved, world=1)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # autocast, not DeepSpeed's bf16 casts
    cpu_has(monkeypatch, False, False)
    resolved, words = with_resolved_precision(cfg, cpu)
    assert resolved.train.precision == "fp32" and words == "fp32 (auto: no native bf16 on this CPU)"


def test_towers_run_in_bf16_and_the_loss_in_fp32_on_fp32_weights(tiny_cfg: dict) -> None:
    cfg = load_config(tiny_cfg, ["data.workers=0"])
    module = build_pretrainer(cfg).train()
    batch = next(iter(train_loader(cfg, build_data_specs(cfg), 0, 1)[0]))
    linear_out: list[torch.dtype] = []
    for m in module.model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: linear_out.append(out.dtype))
    plain = module.embed(batch)
    module.set_autocast("cpu", torch.bfloat16)
    outputs = module.embed(batch)
    assert set(linear_out[:len(linear_out) // 2]) == {torch.float32} and set(linear_out[len(linear_out) // 2:]) == {torch.bfloat16}
    for m in ("image", "text"):  # unit embeddings within bf16 rounding of fp32's
        assert 0 < (outputs[m].embedding.float() - plain[m].embedding).abs().max() < 3e-2
    loss = module.loss(outputs, batch)["loss"]
    assert loss.dtype == torch.float32
    # the same loss as the objective on fp32 copies of the embeddings with no autocast at all
    module.set_autocast("cpu", None)
    assert torch.equal(loss, module.loss(to_fp32(outputs), batch)["loss"])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and inside autocast too: the loss turns it off itself
        assert torch.equal(loss, module.loss(to_fp32(outputs), batch)["loss"])  # (nn.precision.full_precision)
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# bf16 vs fp32 over 200 steps of the tiny CLIP (same seed, data and schedule, lr 3e-4): the mean loss of every
# 50-step window within 0.15 and 12% of fp32's, the last window within 0.02. Measured (1 thread): gaps 0.01, 0.077
# (6%), 0.004, 0.001; single steps drift further where the loss falls fastest (training is chaotic and bf16
# rounding is a perturbation like any other: a shift of a few steps there), then both settle on the same plateau.
STEPS, WINDOW, BOUND, REL_BOUND, LAST_BOUND = 200, 50, 0.15, 0.12, 0.02


@pytest.mark.slow
def test_bf16_losses_track_fp32_over_a_few_hundred_steps(tiny_cfg: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        summary = mmpt.train(tiny_cfg, train__steps=STEPS, train__precision=precision, train__log_every=1,
                             train__checkpoint_every=STEPS, train__log_sample_keys=False, optim__lr=3e-4,
                             train__out_dir=tmp_path / precision)
        recs = [json.loads(x) for x in open(Path(summary.run_dir) / "metrics.jsonl")]
        losses[precision] = np.array([r["loss"] for r in recs if r.get("kind") == "train"])
    assert "bf16 autocast, fp32 weights" in capsys.readouterr().out
    ref, got = (losses[p].reshape(-1, WINDOW).mean(1) for p in ("fp32", "bf16"))
    gap = np.abs(got - ref)
    assert (gap <= BOUND).all() and (gap / ref <= REL_BOUND).all() and gap[-1] <= LAST_BOUND, \
        f"window means fp32 {ref}, bf16 {got}"
    assert ref[-1] < ref[0] - 0.3 and got[-1] < got[0] - 0.3  # both learn


def test_training_attention_under_cpu_bf16_runs_in_fp32() -> None:
    """torch's CPU flash kernel is 2-3x slower in bf16: training attention runs it in fp32 (same result as fp32
    attention on the bf16 projections); inference and fp32 keep plain SDPA."""
    from torch.nn import functional as F

    from mmpt.nn.precision import attention

    q, k, v = (torch.randn(2, 3, 7, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, is_causal=True)
        with torch.no_grad():
            inference = attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float32 and inference.dtype == torch.bfloat16
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True))
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
