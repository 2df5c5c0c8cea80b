"""model.adapt: frozen towers stay bit-identical and hold no optimizer state (ZeRO 2 and 3), last-N blocks,
LoRA (peft on linear layers, packed q/k/v on nn.MultiheadAttention) trains and merges to the same outputs,
and exports merge adapters unless asked to keep them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from shardkit import tiny_config
from torch import nn

from mmpt.config import TowerAdapt, load_config
from mmpt.parts.adapt import add_lora, has_adapters, merge_adapters
from mmpt.pretrainer import build_pretrainer, set_seed
from mmpt.registry import ConfigError, encoders


def adapted(raw: dict, **adapt: dict) -> dict:
    raw = copy.deepcopy(raw)
    raw["model"]["adapt"] = adapt
    return raw


def optimizer_params(engine) -> list[nn.Parameter]:
    """The parameters DeepSpeed's ZeRO optimizer keeps state for."""
    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
    return [p for g in groups for p in g]


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_tower_is_bit_identical_and_has_no_optimizer_state(color_shards: list[str], tmp_path: Path,
                                                                   stage: int) -> None:
    import deepspeed

    from mmpt.training.loop import train

    raw = adapted(tiny_config(color_shards, tmp_path / "run", steps=3, checkpoint_every=3, zero_stage=stage,
                              stage3_param_persistence_threshold=0),
                  text={"mode": "frozen", "train_head": False}, image={"mode": "lora", "rank": 2})
    # an OpenCLIP image tower: LoRA on its packed q/k/v (nn.MultiheadAttention) under ZeRO partitioning
    raw["model"]["encoders"]["image"] = {"name": "image/open_clip", **encoders.get("image/open_clip").tiny_configs[0]}
    cfg = load_config(raw)
    set_seed(cfg.seed)
    before = {n: p.detach().clone() for n, p in build_pretrainer(cfg).named_parameters()}
    engine = train(cfg).engine
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        after = {n: p.detach().clone() for n, p in params.items()}
    trainable = {n for n, p in params.items() if p.requires_grad}
    in_optimizer = {id(p) for p in optimizer_params(engine)}
    engine.destroy()
    frozen = [n for n in before if n.startswith(("model.encoders.text.", "model.heads.text."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not trainable & set(frozen)
    assert {n for n, p in params.items() if id(p) in in_optimizer} == trainable
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(n.startswith("model.encoders.image.") for n in lora)
    assert any(not torch.equal(before[n], after[n]) for n in lora)
    base = [n for n in before if n.startswith("model.encoders.image.") and "lora_" not in n]
    assert all(torch.equal(before[n], after[n]) for n in base)  # LoRA leaves the base weights alone


def test_a_frozen_tower_stays_frozen_in_a_deep_copy(tiny_cfg: dict) -> None:
    model = build_pretrainer(load_config(adapted(tiny_cfg, text={"mode": "frozen"})))
    clone = copy.deepcopy(model).train()
    tower = clone.model.encoders["text"]
    assert not tower.training and tower.forward.__self__ is tower
    out = tower(clone.model.data["text"].prepare(["a red square"]))
    assert not out.pooled.requires_grad


def test_last_blocks_trains_the_end_of_the_stack(tiny_cfg: dict) -> None:
    raw = copy.deepcopy(tiny_cfg)
    raw["model"]["encoders"]["text"]["depth"] = 3
    model = build_pretrainer(load_config(adapted(raw, text={"mode": "last_blocks", "blocks": 2})))
    trainable = {n for n, p in model.model.encoders["text"].named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.blocks.1.", "trunk.blocks.2.", "norm.")) for n in trainable)
    assert any(n.startswith("norm.") for n in trainable) and any(n.startswith("trunk.blocks.1.") for n in trainable)
    with pytest.raises(ConfigError, match="blocks: 5 trailing blocks asked, trunk.blocks has 3"):
        build_pretrainer(load_config(adapted(raw, text={"mode": "last_blocks", "blocks": 5})))


def test_adapt_keys_are_checked(tiny_cfg: dict) -> None:
    with pytest.raises(ConfigError, match="model.adapt.audio: no encoder"):
        load_config(adapted(tiny_cfg, audio={"mode": "frozen"}))
    with pytest.raises(ConfigError, match="model.adapt.text.mode: expected full|frozen"):
        load_config(adapted(tiny_cfg, text={"mode": "freeze"}))
    with pytest.raises(ConfigError, match="model.adapt.text.rnak: unknown key"):
        load_config(adapted(tiny_cfg, text={"mode": "lora", "rnak": 4}))
    with pytest.raises(ConfigError, match="targets .* match no linear"):
        build_pretrainer(load_config(adapted(tiny_cfg, text={"mode": "lora", "targets": ["nothing"]})))


def train_a_little(module: nn.Module, x: torch.Tensor, run, steps: int = 5) -> None:
    """A few Adam steps on whatever requires grad, pushing outputs away from where they start."""
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(run(module, x))
    for _ in range(steps):
        opt.zero_grad()
        ((run(module, x) - target) ** 2).mean().backward()
        opt.step()


def check_lora_trains_and_merges(module: nn.Module, x: torch.Tensor, run, spec: TowerAdapt) -> None:
    torch.manual_seed(0)
    start = run(module, x).detach()
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    add_lora(module, spec, "test")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == \
        {n for n, _ in module.named_parameters() if "lora_" in n}
    torch.testing.assert_close(run(module, x), start)  # B starts at zero: the adapted module is the base one
    train_a_little(module, x, run)
    module.eval()
    with torch.no_grad():
        tuned = run(module, x)
        assert (tuned - start).abs().max() > 1e-3
        assert merge_adapters(module) > 0 and not has_adapters(module)
        merged = run(module, x)
    assert sorted(n for n, _ in module.named_parameters()) == sorted(base)  # plain key names again
    torch.testing.assert_close(merged, tuned, rtol=0, atol=1e-5)


def test_lora_on_open_clip_packed_qkv_trains_and_merges() -> None:
    """OpenCLIP towers use nn.MultiheadAttention (q/k/v packed in in_proj_weight)."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    torch.manual_seed(0)
    text = TextTransformer(context_length=8, vocab_size=64, width=32, heads=2, layers=2, output_dim=16)
    ids = torch.randint(1, 64, (3, 8))
    check_lora_trains_and_merges(text, ids, lambda m, x: m(x), TowerAdapt(mode="lora", rank=2, alpha=4.0))
    assert isinstance(text.transformer.resblocks[0].attn, nn.MultiheadAttention)
    vision = VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    images = torch.randn(2, 3, 16, 16)
    check_lora_trains_and_merges(vision, images, lambda m, x: m(x),
                                 TowerAdapt(mode="lora", rank=2, alpha=4.0, packed="qv", targets=["attn"]))


def test_lora_packed_rows_follow_packed_letters() -> None:
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    add_lora(nn.Sequential(attn), TowerAdapt(mode="lora", rank=2, packed="k"), "test")
    lora = attn.parametrizations.in_proj_weight[0]
    nn.init.normal_(lora.lora_B)
    delta = attn.in_proj_weight - attn.parametrizations.in_proj_weight.original
    assert delta[:8].abs().max() == 0 and delta[16:].abs().max() == 0 and delta[8:16].abs().max() > 0
    assert not parametrized_out(attn)


def parametrized_out(attn: nn.MultiheadAttention) -> bool:
    return hasattr(attn.out_proj, "parametrizations")


def test_lora_on_mmpt_and_hf_linear_layers_trains_and_merges(tiny_cfg: dict) -> None:
    model = build_pretrainer(load_config(tiny_cfg))
    tower = model.model.encoders["text"]
    fields = model.model.data["text"].prepare(["a red square", "a blue one"])
    check_lora_trains_and_merges(tower, fields, lambda m, x: m(x).pooled, TowerAdapt(mode="lora", rank=2))
    hf = encoders.build("text/hf", path="t", config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "intermediate_size": 64,
                                                       "vocab_size": 100}, tokenizer="openclip-bpe").eval()
    ids = {"ids": torch.randint(0, 100, (2, 6)), "mask": torch.ones(2, 6, dtype=torch.bool)}
    check_lora_trains_and_merges(hf, ids, lambda m, x: m(x).pooled,
                                 TowerAdapt(mode="lora", rank=2, targets=["query", "value"]))


def test_export_merges_adapters_unless_kept(color_shards: list[str], tmp_path: Path) -> None:
    import mmpt
    from mmpt.commands.export import export
    from mmpt.training.loop import train

    raw = adapted(tiny_config(color_shards, tmp_path / "run", steps=3, checkpoint_every=3),
                  image={"mode": "lora", "rank": 2}, text={"mode": "frozen"})
    engine = train(load_config(raw)).engine
    engine.module.eval()
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = engine.module.encode("image", images)
    merged = mmpt.load(str(export(tmp_path / "run", tmp_path / "merged.safetensors")))[0]
    kept = mmpt.load(str(export(tmp_path / "run", tmp_path / "kept.safetensors", keep_adapters=True)))[0]
    assert not has_adapters(merged) and has_adapters(kept)
    assert "lora" not in str(merged.model.encoders["image"])
    # freezing is how the run trained: the exported model's towers take gradients again
    assert all(p.requires_grad for p in merged.parameters())
    for model in (merged, kept):
        torch.testing.assert_close(model.encode("image", images), want, rtol=0, atol=1e-5)


def test_last_blocks_finds_a_hugging_face_layer_stack() -> None:
    from mmpt.parts.adapt import adapt_tower

    tower = encoders.build("text/hf", path="t", tokenizer="openclip-bpe", config={
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100})
    adapt_tower(tower, TowerAdapt(mode="last_blocks", blocks=1), "test")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layer.2.") for n in trainable)
