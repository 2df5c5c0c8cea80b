"""Matryoshka and Starbucks (2D Matryoshka) sizes on clip, siglip and mlm, each against a naive per-size loop
written here (own InfoNCE / sigmoid / MLM-head code; sub-layer towers rebuilt shallower from the same weights),
layer exits, ``mmpt embed --dim/--layer`` and eval's ``dim``/``layer``. The 2-rank ZeRO-3 run is in tests/train."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpt.contracts import Batch, EncoderOutput
from mmpt.encoders.text import TextTransformer
from mmpt.model import MultimodalModel
from mmpt.nn.layers import layer_exit
from mmpt.nn.matryoshka import Nesting
from mmpt.nn.tokenizers import build_tokenizer
from mmpt.objectives.contrastive import CLIP
from mmpt.objectives.masked import MLM
from mmpt.objectives.siglip import SigLIP
from mmpt.registry import ConfigError


def _infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _sigmoid(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    z = 2 * torch.eye(a.shape[0]) - 1
    return -F.logsigmoid(z * (scale * a @ b.T + bias)).sum() / a.shape[0]


def _outputs(n: int = 6, e: int = 16, seed: int = 0) -> tuple[dict[str, EncoderOutput], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ra = torch.randn(n, e, generator=g, requires_grad=True)
    rb = torch.randn(n, e, generator=g, requires_grad=True)
    outs = {m: EncoderOutput(tokens=torch.zeros(n, 1, e), mask=None, pooled=r, embedding=F.normalize(r, dim=-1))
            for m, r in (("image", ra), ("text", rb))}
    return outs, ra, rb


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_nested_dims_loss_and_grads_equal_a_per_dim_loop(objective: str) -> None:
    dims, weights = [4, 8, 16], [1.0, 0.5, 2.0]
    kw = {"pairs": [["image", "text"]], "matryoshka_dims": dims, "matryoshka_weights": weights}
    obj = CLIP(init_logit_scale=10.0, **kw) if objective == "clip" else SigLIP(**kw)
    outs, ra, rb = _outputs()
    batch = Batch(fields={}, present={}, keys=[])
    got = obj(outs, batch)
    got.loss.backward()
    grads = ra.grad.clone(), rb.grad.clone()
    ra.grad = rb.grad = None
    ref = torch.zeros(())
    for d, w in zip(dims, weights, strict=True):
        a, b = F.normalize(ra[:, :d], dim=-1), F.normalize(rb[:, :d], dim=-1)  # prefix of the raw projection
        ref = ref + w * (_infonce(a, b, 10.0) if objective == "clip" else _sigmoid(a, b, 10.0, -10.0))
        one = _infonce(a, b, 10.0) if objective == "clip" else _sigmoid(a, b, 10.0, -10.0)
        assert float(got.metrics[f"image_text/d{d}/loss"]) == pytest.approx(float(one.detach()), rel=1e-5)
    ref.backward()
    assert float(got.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(grads[0], ra.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], rb.grad, rtol=1e-4, atol=1e-6)
    # without the option the objective is unchanged: the full-size loss alone
    plain = (CLIP(init_logit_scale=10.0, pairs=[["image", "text"]]) if objective == "clip"
             else SigLIP(pairs=[["image", "text"]]))(outs, batch).loss
    assert float(got.metrics["image_text/d16/loss"]) == pytest.approx(float(plain), rel=1e-6)


def _text_model(depth: int = 3, width: int = 32, embed: int = 16, causal: bool = True, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    towers = {m: TextTransformer(context_length=12, width=width, depth=depth, heads=2, causal=causal,
                                 pool="eot" if causal else "cls") for m in ("text", "caption")}
    return MultimodalModel(towers, embed)


def _shallow(tower: TextTransformer, layers: int) -> TextTransformer:
    """An independent copy of ``tower`` built with ``layers`` blocks, holding the same weights."""
    blocks = len(tower.trunk.blocks)
    copy = TextTransformer(context_length=tower.context_length, width=tower.width, depth=layers, heads=2,
                           causal=tower.trunk.blocks[0].attn.causal, pool=tower.pool)
    state = {k: v for k, v in tower.state_dict().items()
             if not k.startswith("trunk.blocks.") or int(k.split(".")[2]) < layers}
    copy.load_state_dict(state)
    assert len(copy.trunk.blocks) == layers <= blocks
    return copy


def _text_batch(n: int = 5) -> tuple[Batch, dict[str, torch.Tensor]]:
    tok = build_tokenizer("openclip-bpe", 12)
    ids, mask = tok.encode([f"a {c} shape on a {b} background" for c, b in
                            zip(["red", "blue", "green", "pink", "gray"], ["white", "black", "tan", "plum", "lime"])][:n])
    fields = {"ids": ids, "mask": mask}
    return Batch(fields={"text": fields, "caption": fields}, present={}, keys=[]), fields


def test_layer_exit_equals_a_shallower_tower_and_restores() -> None:
    model = _text_model()
    _, fields = _text_batch()
    tower = model.encoders["text"]
    for layers in (1, 2):
        with layer_exit(tower, layers):
            got = tower(fields).pooled
        torch.testing.assert_close(got, _shallow(tower, layers)(fields).pooled)
    assert tower.trunk.exit_at is None
    with pytest.raises(ConfigError, match="layer=4: expected 1 <= layer <= 3"):
        with layer_exit(tower, 4):
            pass


@pytest.mark.parametrize("sample", [False, True])
def test_starbucks_pairs_equal_a_naive_loop(sample: bool) -> None:
    pairs = [[1, 4], [2, 8], [3, 16]]
    model = _text_model()
    batch, fields = _text_batch()
    obj = CLIP(pairs=[["text", "caption"]], init_logit_scale=10.0, starbucks=pairs, starbucks_sample=sample)
    assert obj.uses_model
    outputs = model(batch.fields)
    torch.manual_seed(0)
    got = obj(outputs, batch, model)
    trained = [(1, 4), (2, 8), (3, 16)]
    if sample:  # the largest pair plus one other, drawn from the step counter (the same draw on every rank)
        g = torch.Generator().manual_seed(0)
        trained = [trained[int(torch.randint(2, (1,), generator=g))], trained[-1]]
        assert int(obj.nesting.step) == 1
    ref = 0.0
    for layer, d in trained:
        emb = {m: model.heads[m](_shallow(model.encoders[m], layer)(fields).pooled) for m in ("text", "caption")}
        ref += float(_infonce(F.normalize(emb["text"][:, :d], dim=-1), F.normalize(emb["caption"][:, :d], dim=-1), 10.0))
    assert float(got.loss) == pytest.approx(ref, rel=1e-5)
    assert sorted(k for k in got.metrics if k.endswith("/loss")) == sorted(
        f"text_caption/L{layer}_d{d}/loss" for layer, d in trained)


def _mlm_reference(model: MultimodalModel, mlm: MLM, fields: dict[str, torch.Tensor], masked: torch.Tensor,
                   selected: torch.Tensor, layer: int | None, d: int) -> torch.Tensor:
    tower = model.encoders["text"] if layer is None else _shallow(model.encoders["text"], layer)
    h = tower({**fields, "ids": masked}).tokens[selected][:, :d]
    lin, ln = mlm.transform[0], mlm.transform[2]
    h = F.gelu(h @ lin.weight[:d, :d].T + lin.bias[:d])
    h = F.layer_norm(h, (d,), ln.weight[:d], ln.bias[:d], ln.eps)
    logits = h @ model.encoders["text"].token_embed.weight[:, :d].T
    return F.cross_entropy(logits, fields["ids"][selected])


@pytest.mark.parametrize("option", ["matryoshka_dims", "starbucks"])
def test_mlm_sub_dims_and_sub_layers_equal_a_naive_loop(option: str) -> None:
    model = _text_model(causal=False)
    model.data = {"text": type("D", (), {"tokenizer": build_tokenizer("openclip-bpe", 12)})()}
    batch, fields = _text_batch()
    exits = [(None, 8), (None, 16), (None, 32)] if option == "matryoshka_dims" else [(1, 8), (2, 16), (3, 32)]
    value = [d for _, d in exits] if option == "matryoshka_dims" else [list(e) for e in exits]
    mlm = MLM(modality="text", width=32, rate=0.5, **{option: value})
    torch.manual_seed(3)
    got = mlm({}, batch, model)
    torch.manual_seed(3)
    masked, selected = mlm.mask_batch(fields, None, mlm.plan(model), 0.5)
    assert selected.sum() > 3
    ref = sum(float(_mlm_reference(model, mlm, fields, masked, selected, layer, d)) for layer, d in exits)
    assert float(got.loss) == pytest.approx(ref, rel=1e-5)
    # the full size through the nested head is the plain head exactly
    plain = MLM(modality="text", width=32, rate=0.5)
    plain.load_state_dict(mlm.state_dict())
    torch.manual_seed(3)
    full = float(plain({}, batch, model).loss)
    key = "d32/loss" if option == "matryoshka_dims" else "L3_d32/loss"
    assert float(got.metrics[key]) == full


def test_nesting_config_errors() -> None:
    with pytest.raises(ConfigError, match="clip.matryoshka_dims: expected distinct sizes from small to large"):
        Nesting("clip", dims=[64, 32])
    with pytest.raises(ConfigError, match="give matryoshka_dims or starbucks, not both"):
        Nesting("clip", dims=[8], starbucks=[[1, 8]])
    with pytest.raises(ConfigError, match=r"matryoshka_weights: expected 2 weights"):
        Nesting("siglip", dims=[8, 16], weights=[1.0])
    with pytest.raises(ConfigError, match="starbucks: expected pairs from small to large"):
        Nesting("mlm", starbucks=[[2, 16], [1, 32]])
    with pytest.raises(ConfigError, match="needs at least two pairs"):
        Nesting("mlm", starbucks=[[2, 16]], sample=True)
    with pytest.raises(ConfigError, match="mlm.matryoshka_dims: size 64 is larger than mlm.width"):
        MLM(modality="text", width=32, matryoshka_dims=[16, 64])
    outs, _, _ = _outputs(e=16)
    with pytest.raises(ConfigError, match="clip.matryoshka_dims: size 32 is larger than the embedding size"):
        CLIP(pairs=[["image", "text"]], matryoshka_dims=[8, 32])(outs, Batch(fields={}, present={}, keys=[]))


def test_eval_dim_and_layer_cut_every_embedding() -> None:
    from mmpt.eval.common import embed_texts, nested_size

    model = _text_model()
    model.data = {"text": type("D", (), {})()}
    tok = build_tokenizer("openclip-bpe", 12)

    class Spec:
        def prepare(self, texts: list[str], train: bool) -> dict[str, torch.Tensor]:
            ids, mask = tok.encode(texts)
            return {"ids": ids, "mask": mask}

    texts = ["a red shape", "a blue circle on a background", "a square"]
    specs = {"text": Spec()}
    with torch.no_grad():
        full = embed_texts(model, specs, texts, 2)
        with nested_size(dim=4, layer=2):
            cut = embed_texts(model, specs, texts, 2)
        tower = _shallow(model.encoders["text"], 2)
        ref = F.normalize(model.heads["text"](tower(Spec().prepare(texts, False)).pooled)[:, :4], dim=-1)
    assert full.shape == (3, 16) and cut.shape == (3, 4)
    torch.testing.assert_close(cut, ref)
    assert math.isclose(float(cut.norm(dim=-1).min()), 1.0, rel_tol=1e-5)


def test_task_keys_dim_layer_are_checked() -> None:
    from mmpt.eval.run import build_tasks

    with pytest.raises(ConfigError, match="dim: expected a positive integer or null"):
        build_tasks([{"name": "zero_shot", "data": __file__, "label_key": "color", "dim": 0}])


def test_embed_dim_and_layer(color_shards: list[str], tmp_path) -> None:
    """``mmpt embed --dim 8`` writes the normalised first 8 dims of the full embeddings; ``--layer 1`` those of
    the towers stopped after block 1 (2-block towers); the manifest records both; a dim above the size fails."""
    import json

    import numpy as np
    from exportkit import train_and_export

    from mmpt.commands.embed import embed
    from mmpt.commands.export import load
    from mmpt.data.loader import eval_loader

    path = train_and_export(color_shards[:1], tmp_path, image={"depth": 2}, text={"depth": 2})
    runs = {name: tmp_path / name for name in ("full", "dim", "layer")}
    for name, kw in (("full", {}), ("dim", {"dim": 8}), ("layer", {"dim": 8, "layer": 1})):
        embed(str(path), color_shards[0], "image", str(runs[name]), batch_size=16, workers=0, progress=False,
              dtype="float32", precision="fp32", **kw)
    full, dim, layer = (np.load(runs[n] / "img_emb" / "img_emb_0.npy") for n in ("full", "dim", "layer"))
    assert full.shape == (40, 32) and dim.shape == layer.shape == (40, 8)
    np.testing.assert_allclose(dim, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-5)
    assert json.loads((runs["layer"] / "img_manifest.json").read_text())["settings"]["layer"] == 1
    model, transforms, _ = load(str(path))
    batch = next(iter(eval_loader(color_shards[:1], {"image": transforms["image"]}, 40, workers=0)))
    with torch.no_grad(), layer_exit(model.model.encoders["image"], 1):
        ref = F.normalize(model.model.encode_fields("image", batch.fields["image"]).embedding[:, :8], dim=-1)
    np.testing.assert_allclose(layer, ref.numpy(), atol=1e-5)
    assert not np.allclose(layer, dim, atol=1e-3)
    with pytest.raises(ConfigError, match="--dim 64: expected 1 <= dim <= 32"):
        embed(str(path), color_shards[0], "image", str(tmp_path / "bad"), progress=False, dim=64)


def test_siglip_nested_sizes_on_two_ranks_equal_one_process(objective_ranks) -> None:
    """SigLIP with Matryoshka sizes on 2 gloo ranks (each size through the chunked bidirectional ring, one sample
    absent) equals the per-size loop on the concatenated batch in one process: loss, feature and parameter grads
    as ranks that average gradients see them."""
    import _clip_ranks as worker

    res = [r["siglip/module_nested"] for r in objective_ranks("siglip")]
    w = len(res)
    got = (torch.stack([r["loss"] for r in res]).mean(), torch.cat([r["grad_a"] for r in res]) / w,
           torch.cat([r["grad_b"] for r in res]) / w, torch.stack([r["grad_scale"] for r in res]).mean(0),
           torch.stack([r["grad_bias"] for r in res]).mean(0))
    a_glob, b_glob = worker.global_inputs()
    some = worker.global_masks()["some"]
    a, b = a_glob.clone().requires_grad_(True), b_glob.clone().requires_grad_(True)
    log_scale = torch.tensor([math.log(10.0)], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    loss = torch.zeros(())
    for d, weight in ((4, 1.0), (worker.DIM, 0.5)):  # the naive loop: dense sigmoid loss over present pairs
        x, y = F.normalize(a[:, :d], dim=-1)[some], F.normalize(b[:, :d], dim=-1)[some]
        z = 2 * torch.eye(len(x)) - 1
        loss = loss + weight * -F.logsigmoid(z * (log_scale.exp() * x @ y.T + bias)).sum() / len(x)
    loss.backward()
    for name, g, ref in zip(("loss", "grad a", "grad b", "grad scale", "grad bias"), got,
                            (loss.detach(), a.grad, b.grad, log_scale.grad, bias.grad), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
