"""caption and coca objectives: CoCa's loss equals open_clip's CoCaLoss on the same logits and weights, the
caption loss ignores padding and absent samples, and the objectives decode with a KV cache exactly as
without one (greedy and beam, real tiny towers).

Tolerance: rtol 1e-5, atol 1e-6 in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.contracts import Batch
from mmpt.nn.generate import GenerationConfig, generate
from mmpt.objectives.captioning import caption_loss, coca_loss
from mmpt.objectives.contrastive import GatherMode
from mmpt.pretrainer import Pretrainer, build_pretrainer
from mmpt.registry import ConfigError

CAPTIONS = ["a red circle", "a large blue square on a green background", "a star", "a small pink ring at the top"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def pretrainer(objective: dict) -> Pretrainer:
    raw = tiny_config(["unused.tar"], Path("unused"))
    raw["objectives"] = {objective["name"]: objective}
    torch.manual_seed(0)
    return build_pretrainer(load_config(raw)).eval()


def batch(model: Pretrainer, captions: list[str] = CAPTIONS, text_present: list[bool] | None = None) -> Batch:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in captions]
    fields = {"image": model.model.data["image"].prepare(images), "text": model.model.data["text"].prepare(captions)}
    present = {"image": torch.ones(len(captions), dtype=torch.bool),
               "text": torch.tensor(text_present or [True] * len(captions))}
    return Batch(fields=fields, present=present, keys=[f"k{i}" for i in range(len(captions))])


@pytest.mark.parametrize(("clip_weight", "caption_weight"), [(1.0, 2.0), (0.5, 3.0)])
def test_coca_loss_equals_open_clip_coca_loss(clip_weight: float, caption_weight: float) -> None:
    from open_clip.loss import CoCaLoss

    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(6, 16, generator=g), dim=-1), F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    logits = torch.randn(6, 9, 50, generator=g)
    labels = torch.randint(1, 50, (6, 9), generator=g)  # id 0 is OpenCLIP's padding
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    labels = labels.masked_fill(~mask, 0)
    scale = torch.tensor(14.3)
    ref_clip, ref_caption = CoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight)(
        a, b, logits, labels, scale)
    clip, caption, _ = coca_loss(a, b, logits[mask], labels[mask], scale, clip_weight=clip_weight,
                                 caption_weight=caption_weight, gather=GatherMode("local"))
    assert_close(clip, ref_clip)
    assert_close(caption, ref_caption)


def test_coca_objective_equals_open_clip_coca_loss_on_its_own_logits() -> None:
    from open_clip.loss import CoCaLoss

    model = pretrainer({"name": "coca", "width": 32, "depth": 1, "heads": 2, "memory_width": 32,
                        "clip_weight": 1.0, "caption_weight": 2.0})
    obj = model.objectives["coca"]
    seen = {}
    obj.decoder.register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))
    b = batch(model)
    outputs = model.embed(b)
    loss = model.loss(outputs, b)["loss"]
    ids, mask = b.fields["text"]["ids"], b.fields["text"]["mask"]
    # the decoder scores counted positions only; CoCaLoss takes (B, T, V): padding gets logits it ignores
    full = torch.randn(*ids[:, 1:].shape, seen["logits"].shape[-1])
    full[mask[:, 1:]] = seen["logits"]
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], 0)
    scale = obj.logit_scale.exp()[0]
    ref = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        outputs["image"].embedding, outputs["text"].embedding, full, labels, scale)
    assert_close(loss, ref[0] + ref[1])
    assert seen["logits"].shape[0] == int(mask[:, 1:].sum())


def naive_caption_loss(decoder: torch.nn.Module, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       keep: list[bool], smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy one counted position at a time, each sample decoded on its own."""
    terms = []
    for i in range(len(ids)):
        logits = decoder(ids[i:i + 1, :-1], memory[i:i + 1])[0]
        for t in range(ids.shape[1] - 1):
            if keep[i] and mask[i, t + 1]:
                logp = logits[t].log_softmax(-1)
                terms.append(-(1 - smoothing) * logp[ids[i, t + 1]] - smoothing * logp.mean())
    return torch.stack(terms).mean()


def test_caption_loss_ignores_padding_and_absent_samples() -> None:
    model = pretrainer({"name": "caption", "context_length": 16, "width": 32, "depth": 1, "heads": 2,
                        "memory_width": 32, "label_smoothing": 0.1})
    obj = model.objectives["caption"]
    keep = [True, True, False, True]
    b = batch(model, text_present=keep)
    outputs = model.embed(b)
    out = model.loss(outputs, b)
    ids, mask = b.fields["text"]["ids"], b.fields["text"]["mask"]
    assert_close(out["loss"], naive_caption_loss(obj.decoder, outputs["image"].tokens, ids, mask, keep, 0.1))
    # junk after the end of a caption (the padding) changes no counted position
    junk = ids.masked_fill(~mask, 777)
    b.fields["text"]["ids"] = junk
    assert_close(model.loss(model.embed(b), b)["loss"], out["loss"])
    assert 0 <= float(out["metrics"]["caption/token_acc"]) <= 1


def test_caption_loss_without_counted_positions_is_a_zero_with_a_graph() -> None:
    logits = torch.randn(2, 3, 10, requires_grad=True)
    loss = caption_loss(logits[torch.zeros(2, 3, dtype=torch.bool)], torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None


@pytest.mark.parametrize("name", ["caption", "coca"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_objective_decoding_with_cache_equals_without(name: str, strategy: str) -> None:
    extra = {"context_length": 16} if name == "caption" else {}
    model = pretrainer({"name": name, "width": 32, "depth": 1, "heads": 2, "memory_width": 32, **extra})
    obj = model.objectives[name]
    with torch.no_grad():  # a peaked head: float noise between the two paths cannot flip an argmax
        obj.decoder.head.weight.mul_(40)
    fields = batch(model).fields["image"]
    cfg = GenerationConfig(strategy=strategy, beam=3, n_best=2 if strategy == "beam" else 1, max_len=10)
    cached = generate(obj.start_decoding(model.model, fields), cfg)
    uncached = generate(obj.start_decoding(model.model, fields), GenerationConfig(**{**cfg.__dict__, "use_cache": False}))
    assert [[h.tokens for h in s] for s in cached] == [[h.tokens for h in s] for s in uncached]
    assert len(cached) == 4 and all(len(s) == cfg.n_best for s in cached)
    assert any(h.tokens for s in cached for h in s)


def test_generation_longer_than_the_context_is_refused() -> None:
    model = pretrainer({"name": "coca", "width": 32, "depth": 1, "heads": 2, "memory_width": 32})
    decoder = model.objectives["coca"].start_decoding(model.model, batch(model).fields["image"])
    with pytest.raises(ConfigError, match="max_len: 16 .* 16 positions"):
        generate(decoder, GenerationConfig(max_len=16))


def test_wrong_memory_width_names_the_key() -> None:
    model = pretrainer({"name": "coca", "width": 32, "depth": 1, "heads": 2, "memory_width": 48})
    b = batch(model)
    with pytest.raises(ConfigError, match="coca.memory_width: 48, .* 32 wide; set memory_width: 32"):
        model.loss(model.embed(b), b)
    model = pretrainer({"name": "coca", "width": 64, "depth": 1, "heads": 2, "memory_width": 32})
    with pytest.raises(ConfigError, match="coca.width: 64"):
        model.loss(model.embed(b), b)
