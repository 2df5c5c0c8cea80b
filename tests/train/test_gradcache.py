"""GradCache step strategy: the same gradients as one plain step on the whole batch (ZeRO 0-3, one rank
here, two ranks in _train_ranks.py), RNG replay in re-forwards, bitwise resume, config errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from shardkit import tiny_config
from torch import nn

from mmpt.config import load_config
from mmpt.contracts import Batch
from mmpt.registry import ConfigError

# Tolerance, relative to the gradient's norm: per parameter tensor 1e-2, all parameters together 1e-4.
# fp32 on CPU; GradCache sums the same terms in another order. Tensors whose per-sample gradients
# nearly cancel (the logit scale, biases of the text tower) are only accurate to ~1e-3 of their norm
# in fp32, in either strategy: measured against fp64, plain 4.8e-4 and GradCache 1.2e-3 (logit scale).
# Both bounds still catch a mis-scaling (by the chunks or accumulation steps: >= 50%), a chunk left
# out (~1 / chunks) or a gradient buffer carried over from the last step (100%).
PER_TENSOR, OVERALL = 1e-2, 1e-4


def gradcache_config(shards: list[str], out: Path, step: str = "plain", objective: str = "clip",
                     objective_kw: dict | None = None, **train: Any) -> dict:
    """The tiny config (``objective`` on image-text) with a fixed learning rate too small to move any
    weight (1e-30 under AdamW), so repeated steps on one batch must see the same gradients."""
    # fp32: the claim is the same arithmetic; bf16 autocast rounds each chunk's weight gradient (up to ~4% per
    # tensor here), which tests/train/test_precision.py bounds
    raw = tiny_config(shards, out, step=step, log_sample_keys=False, **{"precision": "fp32", **train})
    if step == "gradcache":
        raw["train"].setdefault("gradcache_chunk", 2)
    raw["objectives"] = {objective: {"name": objective, "pairs": [["image", "text"]], **(objective_kw or {})}}
    raw["optim"].update(lr=1e-30, warmup_steps=0, schedule="constant")
    raw["data"]["workers"] = 0
    return raw


def first_batches(raw: dict, n: int, rank: int = 0, world: int = 1) -> list[Batch]:
    """The first ``n`` training batches of this rank."""
    from mmpt.data.loader import train_loader
    from mmpt.pretrainer import build_data_specs

    cfg = load_config(raw)
    it = iter(train_loader(cfg, build_data_specs(cfg), rank, world)[0])
    return [next(it) for _ in range(n)]


def boundary_grads(raw: dict, batches: list[Batch], steps: int = 2,
                   rng_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The full (reduced, unpartitioned) gradient of every parameter at each optimizer step's
    accumulation boundary, training ``steps`` steps on ``batches`` with the strategy ``raw`` names
    (torch's RNG seeded with ``rng_seed`` just before the first step, when given)."""
    from deepspeed.utils import safe_get_full_grad

    from mmpt.pretrainer import set_seed
    from mmpt.training.engine import build_engine, init_distributed
    from mmpt.training.loop import step_strategy

    cfg, d = load_config(raw), init_distributed()
    set_seed(cfg.seed + d.rank)  # as train() does: same weights for both strategies
    engine, _ = build_engine(cfg, d, steps)
    captured: list[dict[str, torch.Tensor]] = []
    take_step = engine.step

    def step(*args: Any, **kwargs: Any) -> None:
        if engine.is_gradient_accumulation_boundary():  # every rank: ZeRO-3's full grad is a gather
            captured.append({n: safe_get_full_grad(p).detach().clone()
                             for n, p in engine.module.named_parameters() if p.requires_grad})
        take_step(*args, **kwargs)

    engine.step = step
    step_fn = step_strategy(cfg)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    for _ in range(steps):
        for batch in batches:
            step_fn(engine, batch)
    engine.destroy()
    return captured


def gradient_gaps(ref: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]) -> list[str]:
    """Where ``got`` differs from ``ref`` beyond the tolerance: 'step N name: relative gap'."""
    assert len(ref) == len(got) and ref, f"{len(ref)} vs {len(got)} optimizer steps"
    bad = []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        assert sorted(r) == sorted(g)
        gaps = {n: (g[n] - r[n]).norm() / r[n].norm().clamp(min=1e-30) for n in r}
        bad += [f"step {i} {n}: {gap:.3g}" for n, gap in gaps.items() if gap > PER_TENSOR]
        flat_r, flat_g = (torch.cat([x[n].flatten() for n in r]) for x in (r, g))
        overall = (flat_g - flat_r).norm() / flat_r.norm()
        if overall > OVERALL:
            bad.append(f"step {i} all parameters: {overall:.3g}")
    return bad


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gradcache_gradients_equal_one_plain_step(color_shards: list[str], tmp_path: Path, stage: int) -> None:
    """Batch 8 in chunks of 2 (4 re-forwards, DeepSpeed accumulation 4): two steps, each with the
    gradients of one plain step on the 8 samples; the second step proves no buffer carries over."""
    plain = gradcache_config(color_shards, tmp_path / "plain", zero_stage=stage, stage3_param_persistence_threshold=0)
    cached = gradcache_config(color_shards, tmp_path / "gc", "gradcache", zero_stage=stage,
                              stage3_param_persistence_threshold=0)
    batches = first_batches(plain, 1)
    ref, got = boundary_grads(plain, batches), boundary_grads(cached, batches)
    assert not gradient_gaps(ref, got)
    assert any(g.abs().max() > 0 for g in ref[0].values())


@pytest.mark.parametrize("objective", ["siglip", "filip"])
def test_gradcache_serves_other_contrastive_objectives(color_shards: list[str], tmp_path: Path,
                                                       objective: str) -> None:
    """The loss's own parameters (SigLIP's bias, FILIP's scale) and token-wise losses (FILIP reads
    every token's embedding) get the plain step's gradients too; ZeRO-3, accumulation over 2 batches."""
    kw = {"zero_stage": 3, "stage3_param_persistence_threshold": 0, "grad_accum": 2}
    plain = gradcache_config(color_shards, tmp_path / "plain", objective=objective, **kw)
    cached = gradcache_config(color_shards, tmp_path / "gc", "gradcache", objective=objective, gradcache_chunk=4, **kw)
    batches = first_batches(plain, 2)
    ref, got = boundary_grads(plain, batches), boundary_grads(cached, batches)
    assert not gradient_gaps(ref, got)
    own = [n for n in ref[0] if n.startswith("objectives.")]
    assert own and all(ref[0][n].abs().max() > 0 for n in own), own


@pytest.mark.parametrize("objective, read", [("clip", {"embedding"}), ("filip", {"token_embedding"})])
def test_gradcache_stops_caching_what_the_loss_does_not_read(color_shards: list[str], tmp_path: Path,
                                                             objective: str, read: set[str]) -> None:
    """The cache keeps only the floating fields the loss takes a gradient from (found on the first
    chunk; CLIP: the embeddings, not the B x T x D tokens), from the first step on."""
    from mmpt.pretrainer import set_seed
    from mmpt.training.engine import build_engine, init_distributed
    from mmpt.training.gradcache import GradCacheStep

    raw = gradcache_config(color_shards, tmp_path / "gc", "gradcache", objective)
    (batch,) = first_batches(raw, 1)
    cfg = load_config(raw)
    set_seed(cfg.seed)
    engine, _ = build_engine(cfg, init_distributed(), 2)
    step = GradCacheStep(2)
    losses = [step(engine, batch)["loss"].item() for _ in range(2)]
    engine.destroy()
    assert losses[0] == losses[1]  # lr 1e-30: the same weights, the same loss
    assert {("image", "tokens"), ("text", "tokens"), ("image", "pooled"), ("text", "pooled")} <= step.unread
    assert not {(m, f) for m in ("image", "text") for f in read} & step.unread


@pytest.fixture()
def dropout_heads(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Engines built from here on get dropout (p 0.3) in front of each projection head: the forward
    draws random numbers, as augmentation on device, drop-path or masking would."""
    import mmpt.training.engine
    from mmpt.pretrainer import build_pretrainer

    def with_dropout(cfg: Any, on_part: Any = None) -> Any:
        module = build_pretrainer(cfg, on_part)
        for m, head in module.model.heads.items():
            module.model.heads[m] = nn.Sequential(nn.Dropout(0.3), head)
        return module

    monkeypatch.setattr(mmpt.training.engine, "build_pretrainer", with_dropout)
    return with_dropout


@pytest.mark.parametrize("objective, objective_kw", [("clip", {}), ("filip", {"max_tokens": 4})])
def test_reforward_replays_each_chunks_random_draws(color_shards: list[str], tmp_path: Path, dropout_heads: Any,
                                                    objective: str, objective_kw: dict) -> None:
    """With dropout in the heads (and FILIP drawing its token subsample in the loss), the gradient is
    that of the embeddings the no-grad pass drew chunk by chunk and of the loss's one draw, and the RNG
    afterwards is where one forward of each chunk and one loss leave it."""
    from mmpt.contracts import TensorRecord
    from mmpt.pretrainer import set_seed
    from mmpt.training.gradcache import chunk_of

    raw = gradcache_config(color_shards, tmp_path / "gc", "gradcache", objective, objective_kw)
    (batch,) = first_batches(raw, 1)
    cfg = load_config(raw)
    set_seed(cfg.seed)
    module = dropout_heads(cfg)
    torch.manual_seed(7)
    outs = [module.embed(chunk_of(batch, i, i + 2)) for i in range(0, len(batch), 2)]
    joined = {m: TensorRecord(**{f: torch.cat([o[m][f] for o in outs]) if isinstance(v, torch.Tensor) else v
                                 for f, v in outs[0][m].items()}) for m in outs[0]}
    module.loss(joined, batch)["loss"].backward()
    rng_after = torch.get_rng_state()
    ref = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    got = boundary_grads(raw, [batch], steps=1, rng_seed=7)
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert not gradient_gaps([ref], got)


def resume_gaps(shards: list[str], tmp_path: Path, **train_kw: Any) -> list[str]:
    """Run 5 steps; crash after step 3 and resume from step 2: the steps whose keys or losses differ."""
    from test_train import step_log

    from mmpt.training.checkpoint import InjectedFault
    from mmpt.training.loop import train

    def run(out: Path, **kw: Any) -> dict:
        return tiny_config(shards, out, steps=5, checkpoint_every=2, **train_kw, **kw)

    train(load_config(run(tmp_path / "ref")))
    with pytest.raises(InjectedFault):
        train(load_config(run(tmp_path / "run", crash_at_step=3)))
    train(load_config(run(tmp_path / "run")), resume="latest")
    ref, got = step_log(tmp_path / "ref"), step_log(tmp_path / "run")
    assert sorted(ref) == sorted(got) and len(ref) == 5
    return [f"step {k}: loss {got[k][1]} vs {ref[k][1]}" for k in ref if got[k] != ref[k]]


def test_gradcache_resume_after_crash_is_bitwise_equal(color_shards: list[str], tmp_path: Path) -> None:
    assert not resume_gaps(color_shards, tmp_path, step="gradcache", gradcache_chunk=4)


@pytest.mark.parametrize("step", ["plain", "gradcache"])
def test_resume_with_random_forward_is_bitwise_equal(color_shards: list[str], tmp_path: Path, dropout_heads: Any,
                                                     step: str) -> None:
    """Dropout on: the RNG stream (through GradCache's replays too) must resume exactly as well."""
    assert not resume_gaps(color_shards, tmp_path, step=step, **({"gradcache_chunk": 4} if step == "gradcache" else {}))


@pytest.mark.parametrize("train_kw, message", [
    ({"step": "gradcache"}, "train.gradcache_chunk: required with train.step=gradcache"),
    ({"step": "gradcache", "gradcache_chunk": 3}, "train.gradcache_chunk: 3 does not divide data.batch_size 8 (e.g. 2 does)"),
    ({"step": "gradcache", "gradcache_chunk": 16}, "train.gradcache_chunk: 16 does not divide data.batch_size 8"),
    ({"step": "gradcache", "gradcache_chunk": 0}, "train.gradcache_chunk: must be >= 1, got 0"),
    ({"step": "gradcash", "gradcache_chunk": 2}, "train.step: expected plain|gradcache, got 'gradcash'"),
])
def test_gradcache_config_errors_are_one_line(color_shards: list[str], tmp_path: Path, train_kw: dict,
                                              message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(color_shards, tmp_path, **train_kw))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("train_kw, message", [
    ({"gradcache_chunk": 4}, "train.gradcache_chunk: 4 is ignored with train.step=plain"),
    ({"step": "gradcache", "gradcache_chunk": 8}, "one chunk per batch saves no memory"),
])
def test_gradcache_config_warnings(color_shards: list[str], tmp_path: Path, train_kw: dict, message: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(tiny_config(color_shards, tmp_path, **train_kw))
    assert any(message in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_gradcache_deepspeed_accumulation(color_shards: list[str], tmp_path: Path) -> None:
    """Each chunk is a DeepSpeed micro-batch; the samples per optimizer step stay batch * accum * world."""
    from mmpt.training.engine import deepspeed_config

    cfg = load_config(tiny_config(color_shards, tmp_path, step="gradcache", gradcache_chunk=2, grad_accum=3))
    ds = deepspeed_config(cfg, world=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 12, 48)


def test_gradcache_warns_about_batch_norm_towers(color_shards: list[str], tmp_path: Path) -> None:
    """BatchNorm in training mode normalises over each chunk, not the whole batch: the gradients are
    no longer one plain step's, and a user choosing GradCache for exactness must hear it."""
    from mmpt.training.engine import build_engine, init_distributed
    from mmpt.training.loop import step_strategy

    raw = gradcache_config(color_shards, tmp_path, step="gradcache")
    raw["model"]["encoders"]["image"] = {"name": "image/timm", "model_name": "test_resnet", "image_size": 32}
    cfg, d = load_config(raw), init_distributed()
    engine, _ = build_engine(cfg, d, 1)
    step_fn = step_strategy(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_fn(engine, first_batches(raw, 1)[0])
        step_fn(engine, first_batches(raw, 1)[0])
    said = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]
    assert len(said) == 1 and "model.encoders.image" in said[0] and "chunk of 2" in said[0], said


def test_gradcache_refuses_objectives_that_encode_themselves() -> None:
    from mmpt.training.gradcache import refuse_encoding_objectives

    class Encodes(torch.nn.Module):
        uses_model = True

    module = torch.nn.Module()
    module.objectives = torch.nn.ModuleDict({"clip": torch.nn.Module(), "mlm": Encodes()})
    with pytest.raises(ConfigError, match=r"gradcache cannot run objectives that encode inputs themselves \(mlm\)"):
        refuse_encoding_objectives(module)
    del module.objectives["mlm"]
    refuse_encoding_objectives(module)


_HOLES = """
import sys, torch
from mmpt.training.gradcache import fix_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = torch.ones(4 * 2**20); del big  # a 16 MB block mmapped, then freed: glibc raises its threshold
parts = [torch.ones(2**19) for _ in range(40)]  # 40 x 2 MB, as a chunk's activations
base = rss()
del parts[::2]  # every other one freed: holes in the heap unless each block was mmapped
print(base - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="glibc/Linux allocator behaviour")
def test_gradcache_fixes_the_mmap_threshold_so_freed_activations_leave(tmp_path: Path) -> None:
    """glibc raises its mmap threshold when a large block is freed; activations freed between chunks
    then stay resident as heap holes (the bench's GradCache peak held ~190 MB of them). A fixed
    threshold returns them to the OS."""
    import subprocess
    import sys

    def released(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    assert released("fixed") > 30, "freed 2 MB tensors should go back to the OS with a fixed threshold"
    assert released("dynamic") < 5, "glibc's dynamic threshold no longer keeps holes: the fix may be moot"


def test_gradcache_step_fixes_the_allocator_once(color_shards: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mmpt.training import gradcache
    from mmpt.training.engine import build_engine, init_distributed
    from mmpt.training.loop import step_strategy

    calls: list[int] = []
    monkeypatch.setattr(gradcache, "fix_mmap_threshold", lambda threshold: calls.append(threshold) or True)
    raw = gradcache_config(color_shards, tmp_path, step="gradcache")
    raw["train"]["gradcache_mmap_threshold"] = 1 << 20  # opt-in
    cfg = load_config(raw)
    engine, _ = build_engine(cfg, init_distributed(), 2)
    step_fn, batch = step_strategy(cfg), first_batches(raw, 1)[0]
    step_fn(engine, batch)
    step_fn(engine, batch)
    engine.destroy()
    assert calls == [1 << 20]
    plain = gradcache.GradCacheStep(2)  # not asked for: the allocator is left alone
    assert plain.mmap_threshold is None
