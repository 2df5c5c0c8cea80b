"""clip_loss and the CLIP objective against OpenCLIP's ClipLoss and naive references, 1 and 2 ranks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mmpt.contracts import Batch, EncoderOutput
from mmpt.objectives.contrastive import CLIP, GatherMode, clip_loss
from mmpt.registry import ConfigError, objectives

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ALL_MODES = [(g, ll) for g in ("local", "no_grad", "with_grad") for ll in (False, True)]

_spec = importlib.util.spec_from_file_location("_clip_ranks", HERE / "_clip_ranks.py")
assert _spec is not None and _spec.loader is not None
ranks_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ranks_worker)


def features(n: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded unit-norm paired features, b correlated with a."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    b = F.normalize(a + 0.7 * torch.randn(n, dim, generator=g), dim=-1)
    return a, b


def run_with_grads(fn, a: torch.Tensor, b: torch.Tensor, scale: float = 12.0):
    """Call ``fn(a, b, scale)`` on fresh leaves; return loss and grads w.r.t. a, b and scale."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    s = torch.tensor([scale], requires_grad=True)
    loss = fn(a, b, s)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad


def naive_present_rows(valid: torch.Tensor):
    """Reference for the masked loss: keep only the present rows, then OpenCLIP's plain loss."""

    def fn(a, b, s):
        return ClipLoss()(a[valid], b[valid], s)

    return fn


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ---- GatherMode -------------------------------------------------------------------------------


def test_gather_mode_parse() -> None:
    assert GatherMode.parse("with_grad", local_loss=True) == GatherMode("with_grad", True)
    assert GatherMode.parse("No-Grad") == GatherMode("no_grad", False)
    assert GatherMode() == GatherMode("no_grad", False)
    with pytest.raises(ConfigError, match="with_grad"):
        GatherMode.parse("with_grads")


# ---- single process ---------------------------------------------------------------------------


@pytest.mark.parametrize("gather,local_loss", ALL_MODES)
@pytest.mark.parametrize("bias", [None, -1.5])
def test_single_process_matches_openclip(gather: str, local_loss: bool, bias: float | None) -> None:
    a, b = features()
    mode = GatherMode(gather, local_loss)
    logit_bias = None if bias is None else torch.tensor([bias])
    ours = run_with_grads(lambda x, y, s: clip_loss(x, y, s, gather=mode, logit_bias=logit_bias)[0], a, b)
    ref_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather == "with_grad", rank=0, world_size=1)
    ref = run_with_grads(lambda x, y, s: ref_fn(x, y, s, logit_bias=logit_bias), a, b)
    for name, o, r in zip(("loss", "grad a", "grad b", "grad scale"), ours, ref):
        assert_close(o, r, name)


def test_bf16_inputs_give_fp32_loss() -> None:
    a, b = features()
    a16, b16 = a.bfloat16(), b.bfloat16()
    loss, metrics = clip_loss(a16, b16, torch.tensor([50.0]), gather=GatherMode())
    ref = ClipLoss()(a16.float(), b16.float(), torch.tensor([50.0]))
    assert loss.dtype == torch.float32
    assert_close(loss, ref, "loss")
    assert metrics["acc"].dtype == torch.float32


def test_masked_all_present_equals_unmasked() -> None:
    a, b = features()
    mode = GatherMode()
    plain = run_with_grads(lambda x, y, s: clip_loss(x, y, s, gather=mode)[0], a, b)
    all_valid = torch.ones(a.shape[0], dtype=torch.bool)
    masked = run_with_grads(lambda x, y, s: clip_loss(x, y, s, gather=mode, valid=all_valid)[0], a, b)
    for name, m, p in zip(("loss", "grad a", "grad b", "grad scale"), masked, plain):
        assert_close(m, p, name)


@pytest.mark.parametrize("absent", [[2], [0, 3, 4, 7], [0, 1, 2, 3, 4, 5, 6]])
def test_masked_equals_present_rows_only(absent: list[int]) -> None:
    a, b = features()
    valid = torch.ones(a.shape[0], dtype=torch.bool)
    valid[absent] = False
    loss, ga, gb, gs = run_with_grads(
        lambda x, y, s: clip_loss(x, y, s, gather=GatherMode(), valid=valid)[0], a, b
    )
    ref_loss, ref_ga, ref_gb, ref_gs = run_with_grads(naive_present_rows(valid), a, b)
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, "loss")
    assert_close(ga, ref_ga, "grad a")
    assert_close(gb, ref_gb, "grad b")
    assert_close(gs, ref_gs, "grad scale")
    assert torch.count_nonzero(ga[~valid]) == 0 and torch.count_nonzero(gb[~valid]) == 0


def test_masked_without_valid_rows_is_a_differentiable_zero() -> None:
    a, b = features()
    none_valid = torch.zeros(a.shape[0], dtype=torch.bool)
    loss, ga, gb, gs = run_with_grads(
        lambda x, y, s: clip_loss(x, y, s, gather=GatherMode(), valid=none_valid)[0], a, b
    )
    assert loss.item() == 0.0
    for g in (ga, gb, gs):
        assert g is not None and torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_accuracy_metric() -> None:
    a, _ = features()
    perfect = clip_loss(a, a, torch.tensor([20.0]), gather=GatherMode())[1]
    assert perfect["acc"].item() == 1.0 and perfect["acc_ba"].item() == 1.0
    wrong = clip_loss(a, a.roll(1, dims=0), torch.tensor([20.0]), gather=GatherMode())[1]
    assert wrong["acc"].item() == 0.0
    # Only rows 0 and 5 present. Row 0's best column overall is absent column 3, so it is right only
    # if absent columns leave the argmax; row 5 is wrong; absent rows (all right) leave the mean.
    valid = torch.zeros(a.shape[0], dtype=torch.bool)
    valid[[0, 5]] = True
    b = a.clone()
    b[0] = F.normalize(a[0] + 0.3 * a[1], dim=0)
    b[3] = a[0]
    b[5] = -a[5]
    unmasked = clip_loss(a, b, torch.tensor([20.0]), gather=GatherMode())[1]
    assert unmasked["acc"].item() == 5 / 8  # rows 0, 3 (its match moved) and 5 miss
    masked = clip_loss(a, b, torch.tensor([20.0]), gather=GatherMode(), valid=valid)[1]
    assert masked["acc"].item() == 0.5


# ---- the CLIP objective -------------------------------------------------------------------------


def encoded(**embeddings: torch.Tensor) -> dict[str, EncoderOutput]:
    return {m: EncoderOutput(tokens=e[:, None], mask=None, pooled=e, embedding=e) for m, e in embeddings.items()}


def batch_with(present: dict[str, torch.Tensor], n: int) -> Batch:
    return Batch(fields={}, present=present, keys=[str(i) for i in range(n)])


def test_clip_registered_and_validates_config() -> None:
    obj = objectives.build("clip", pairs=[["image", "text"]], gather="with_grad", local_loss=True)
    assert isinstance(obj, CLIP)
    assert obj.gather == GatherMode("with_grad", True)
    assert obj.modalities == ("image", "text")
    assert obj.logit_scale.shape == (1,)
    assert_close(obj.logit_scale.exp(), torch.tensor([1 / 0.07]), "init scale")
    names = dict(obj.named_parameters())
    assert obj.no_weight_decay() and obj.no_weight_decay() <= set(names)
    with pytest.raises(ConfigError, match="pairs"):
        CLIP()
    with pytest.raises(ConfigError, match="exactly one"):
        CLIP(pairs=[["image", "text"]], anchor="text")
    with pytest.raises(ConfigError, match="itself"):
        CLIP(pairs=[["image", "image"]])
    with pytest.raises(ConfigError, match="twice"):
        CLIP(pairs=[["image", "text"], ["text", "image"]])
    with pytest.raises(ConfigError, match="gather"):
        CLIP(pairs=[["image", "text"]], gather="allgather")
    with pytest.raises(ConfigError, match="init_logit_scale"):
        CLIP(pairs=[["image", "text"]], init_logit_scale=200.0)
    with pytest.raises(ConfigError, match="local_loss"):
        objectives.build("clip", pairs=[["image", "text"]], local_loss="yes")


def test_clip_pairs_with_missing_modality() -> None:
    n = 8
    img, txt = features(n, seed=1)
    aud, _ = features(n, seed=2)
    audio_present = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    obj = CLIP(pairs=[["image", "text"], ["audio", "text"]], init_logit_scale=10.0)
    out = obj(encoded(image=img, text=txt, audio=aud),
              batch_with({"image": torch.ones(n, dtype=torch.bool), "audio": audio_present}, n))
    scale = torch.tensor([10.0])
    expected = (ClipLoss()(img, txt, scale) + ClipLoss()(aud[audio_present], txt[audio_present], scale)) / 2
    assert_close(out.loss, expected, "loss")
    assert set(out.metrics) == {"image_text/acc", "text_image/acc", "image_text/logit_scale",
                                "audio_text/acc", "text_audio/acc", "audio_text/logit_scale"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in out.metrics.values())
    assert_close(out.metrics["audio_text/logit_scale"], torch.tensor(10.0), "scale metric")
    out.loss.backward()
    assert obj.logit_scale.grad is not None and torch.count_nonzero(obj.logit_scale.grad) == 2


def test_clip_anchor_binds_every_other_modality() -> None:
    n = 6
    txt, img = features(n, seed=3)
    aud, _ = features(n, seed=4)
    obj = CLIP(anchor="text", init_logit_scale=5.0)
    assert obj.modalities == () and obj.logit_scale.shape == (1,)
    out = obj(encoded(image=img, text=txt, audio=aud), batch_with({}, n))
    scale = torch.tensor([5.0])
    expected = (ClipLoss()(txt, aud, scale) + ClipLoss()(txt, img, scale)) / 2
    assert_close(out.loss, expected, "loss")
    assert {"text_audio/acc", "text_image/acc"} <= set(out.metrics)
    with pytest.raises(KeyError, match="anchor"):
        obj(encoded(image=img), batch_with({}, n))


def test_clip_logit_scale_clamped_in_forward_only() -> None:
    a, b = features()
    obj = CLIP(pairs=[["image", "text"]], max_logit_scale=100.0)
    with torch.no_grad():
        obj.logit_scale.fill_(math.log(1000.0))
    out = obj(encoded(image=a, text=b), batch_with({}, a.shape[0]))
    assert_close(out.metrics["image_text/logit_scale"], torch.tensor(100.0), "clamped scale")
    assert_close(out.loss, ClipLoss()(a, b, torch.tensor([100.0])), "loss at the clamp")
    out.loss.backward()
    assert_close(obj.logit_scale.detach(), torch.tensor([math.log(1000.0)]), "parameter untouched")

    frozen = CLIP(pairs=[["image", "text"]], learn_logit_scale=False)
    assert not frozen.logit_scale.requires_grad


def _scale_steps(a: torch.Tensor, b: torch.Tensor, log_scale: float, steps: int) -> list[float]:
    """The logit-scale parameter after each AdamW step on the CLIP loss of fixed features."""
    obj = CLIP(pairs=[["image", "text"]], max_logit_scale=100.0)
    with torch.no_grad():
        obj.logit_scale.fill_(log_scale)
    opt = torch.optim.AdamW(obj.parameters(), lr=0.05, weight_decay=0.0)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        obj(encoded(image=a, text=b), batch_with({}, a.shape[0])).loss.backward()
        opt.step()
        out.append(obj.logit_scale.item())
    return out


def test_logit_scale_above_the_bound_comes_back_when_the_loss_asks() -> None:
    # Unrelated pairs: the loss falls as the scale falls, so a scale stuck above the bound must return.
    a, _ = features(16, seed=5)
    b, _ = features(16, seed=6)
    path = _scale_steps(a, b, math.log(200.0), steps=40)
    assert path[-1] < math.log(100.0), f"logit scale stuck at exp({path[-1]:.3f}) above the bound 100"
    # ...and keeps following the loss below the bound
    assert path[-1] < path[-2]


def test_logit_scale_above_the_bound_does_not_drift_further_up() -> None:
    # Identical pairs of near-parallel features: even at scale 200 the loss wants a larger scale;
    # above the bound that push is blocked.
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.ones(16, 16) + 0.02 * torch.randn(16, 16, generator=g), dim=-1)
    assert ClipLoss()(a, a, torch.tensor([200.0])) > 0.1
    obj = CLIP(pairs=[["image", "text"]], max_logit_scale=100.0)
    with torch.no_grad():
        obj.logit_scale.fill_(math.log(200.0))
    obj(encoded(image=a, text=a), batch_with({}, a.shape[0])).loss.backward()
    assert obj.logit_scale.grad is not None and obj.logit_scale.grad.item() == 0.0
    start = torch.tensor(math.log(200.0)).item()  # as stored in fp32
    assert _scale_steps(a, a, math.log(200.0), steps=5) == [start] * 5


def test_logit_scale_below_the_bound_has_the_plain_gradient() -> None:
    # Below the bound the objective is OpenCLIP's loss of exp(parameter), gradient included.
    a, b = features()
    for scale in (5.0, 99.0):
        obj = CLIP(pairs=[["image", "text"]], init_logit_scale=scale, max_logit_scale=100.0)
        out = obj(encoded(image=a, text=b), batch_with({}, a.shape[0]))
        out.loss.backward()
        log_s = torch.tensor([math.log(scale)], requires_grad=True)
        ref = ClipLoss()(a, b, log_s.exp())
        ref.backward()
        assert_close(out.loss, ref, f"loss at scale {scale}")
        assert_close(obj.logit_scale.grad, log_s.grad, f"grad at scale {scale}")


def _engine_scale_path(shards: list[str], out: Path, stage: int, steps: int, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The logit-scale parameter after each step of a DeepSpeed engine whose scale starts at log(200)."""
    import deepspeed
    from shardkit import tiny_config

    import mmpt.training.engine as engine_mod
    from mmpt.config import load_config
    from mmpt.data.loader import train_loader
    from mmpt.pretrainer import build_data_specs, build_pretrainer, set_seed

    def build_past_the_bound(cfg, on_part=None):
        module = build_pretrainer(cfg, on_part)
        p = module.objectives["clip"].logit_scale
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            p.data.fill_(math.log(200.0))
        return module

    monkeypatch.setattr(engine_mod, "build_pretrainer", build_past_the_bound)
    raw = tiny_config(shards, out, zero_stage=stage, stage3_param_persistence_threshold=0)
    raw["data"]["workers"] = 0
    # Towers barely move (they would soon ask for a larger scale); the scale moves ~0.1 a step.
    raw["optim"].update(lr=1e-5, warmup_steps=0, schedule="constant", lr_scale={"objectives": 1e4})
    cfg = load_config(raw)
    d = engine_mod.init_distributed()
    set_seed(cfg.seed)
    engine, _ = engine_mod.build_engine(cfg, d, steps)
    batches = iter(train_loader(cfg, build_data_specs(cfg), d.rank, d.world)[0])
    p, path = engine.module.objectives["clip"].logit_scale, []
    for _ in range(steps):
        engine.backward(engine(next(batches))["loss"])
        engine.step()
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            path.append(p.item())
    engine.destroy()
    return path


def test_logit_scale_recovers_in_a_deepspeed_engine_at_every_stage(color_shards: list[str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Random towers: the loss wants a scale far below 200. The optimizer's fp32 master (ZeRO-2; a
    # partition of it at ZeRO-3) follows the path of the plain parameter at stage 0, back below the bound.
    paths = {stage: _engine_scale_path(color_shards, tmp_path / f"z{stage}", stage, 12, monkeypatch)
             for stage in (0, 2, 3)}
    assert paths[0][-1] < math.log(100.0), f"stuck above the bound: {paths[0]}"
    # (ZeRO-2/3 step on flat fp32 partitions: rounding differs from torch AdamW, ~3e-6 relative by step 12)
    assert paths[2] == pytest.approx(paths[0], rel=1e-4) and paths[3] == pytest.approx(paths[0], rel=1e-4), paths


# ---- two ranks (gloo) ---------------------------------------------------------------------------



@pytest.fixture(scope="module")
def rank_results(objective_ranks) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each rank's clip scenarios from the shared 2-rank launch (conftest.py)."""
    return objective_ranks("clip")


def _single_reference(mask: torch.Tensor | None):
    """Loss and grads of the concatenated global batch in one process, from OpenCLIP on present rows."""
    a, b = ranks_worker.global_inputs()
    valid = torch.ones(a.shape[0], dtype=torch.bool) if mask is None else mask
    return run_with_grads(naive_present_rows(valid), a, b, ranks_worker.SCALE)


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_two_ranks(rank_results: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    world, n_local = ranks_worker.WORLD, ranks_worker.LOCAL_BATCH
    a_glob, b_glob = ranks_worker.global_inputs()
    for gather, local_loss in ranks_worker.MODES:
        for mask_name, mask in ranks_worker.global_masks().items():
            key = f"{gather}/{int(local_loss)}/{mask_name}"
            res = [r[key] for r in rank_results]
            for r in res:
                assert torch.isfinite(r["loss"]) and torch.isfinite(r["grad_a"]).all(), key

            # Each mode reproduces OpenCLIP's ClipLoss with the same flags, on each rank.
            if mask is None:
                for rank, r in enumerate(res):
                    for name in ("loss", "grad_a", "grad_b", "grad_scale"):
                        assert_close(r[name], r[f"ref_{name}"], f"{key} rank {rank} {name} vs OpenCLIP")

            if gather == "local":
                # No exchange: each rank's loss is the loss of its own (present) rows.
                for rank, r in enumerate(res):
                    rows = slice(rank * n_local, (rank + 1) * n_local)
                    v = torch.ones(n_local, dtype=torch.bool) if mask is None else mask[rows]
                    ref = ClipLoss()(a_glob[rows][v], b_glob[rows][v], torch.tensor([ranks_worker.SCALE]))
                    ref = ref if v.any() else torch.tensor(0.0)
                    assert_close(r["loss"], ref, f"{key} rank {rank} local loss")
                continue

            if mask is not None and not mask.any():
                ref_loss, ref_ga, ref_gb, ref_gs = (torch.tensor(0.0), torch.zeros_like(a_glob),
                                                    torch.zeros_like(b_glob), torch.zeros(1))
            else:
                ref_loss, ref_ga, ref_gb, ref_gs = _single_reference(mask)
            # The full loss on every rank; with local_loss each rank holds its share of it.
            if local_loss:
                assert_close(torch.stack([r["loss"] for r in res]).mean(), ref_loss, f"{key} mean loss")
            else:
                for rank, r in enumerate(res):
                    assert_close(r["loss"], ref_loss, f"{key} rank {rank} loss")
            if mask is None:
                # Every rank sees the same rows per rank, so the mean rank accuracy is the global one.
                ref_acc = clip_loss(a_glob, b_glob, torch.tensor([ranks_worker.SCALE]), gather=GatherMode())[1]
                assert_close(torch.stack([r["acc"] for r in res]).mean(), ref_acc["acc"], f"{key} acc")
                assert_close(torch.stack([r["acc_ba"] for r in res]).mean(), ref_acc["acc_ba"], f"{key} acc_ba")

            if gather == "with_grad":
                # Ranks average parameter grads: (1/W) sum_r dloss_r/dfeats. Each rank's local grad
                # already sums every rank's contribution (all_gather backward), so concatenate / W.
                grad_a = torch.cat([r["grad_a"] for r in res]) / world
                grad_b = torch.cat([r["grad_b"] for r in res]) / world
                grad_s = torch.stack([r["grad_scale"] for r in res]).mean(0)
                assert_close(grad_a, ref_ga, f"{key} averaged grad a")
                assert_close(grad_b, ref_gb, f"{key} averaged grad b")
                assert_close(grad_s, ref_gs, f"{key} averaged grad scale")

    # The CLIP module across ranks equals the module on the concatenated batch in one process.
    some = ranks_worker.global_masks()["some"]
    single = CLIP(pairs=[["image", "text"]], gather="with_grad", local_loss=True)
    a = a_glob.clone().requires_grad_(True)
    out = single(encoded(image=a, text=b_glob), batch_with({"image": some}, a.shape[0]))
    out.loss.backward()
    res = [r["module"] for r in rank_results]
    assert_close(torch.stack([r["loss"] for r in res]).mean(), out.loss.detach(), "module loss")
    assert_close(torch.cat([r["grad_a"] for r in res]) / world, a.grad, "module grad")
    assert_close(torch.stack([r["grad_scale"] for r in res]).mean(0), single.logit_scale.grad, "module scale grad")
