"""filip_loss and the FILIP objective against a naive per-sample Python loop; real tiny towers end to end.

Tolerance: rtol 1e-5, atol 1e-6 in fp32 (the loop sums in another order).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpt.contracts import Batch, EncoderOutput
from mmpt.model import MultimodalModel
from mmpt.objectives.contrastive import GatherMode
from mmpt.objectives.filip import FILIP, filip_loss, subsample_tokens, token_similarity
from mmpt.pretrainer import Pretrainer
from mmpt.registry import ConfigError, encoders, modalities, objectives

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _clip_ranks as ranks_worker  # noqa: E402  (the shared 2-rank harness)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def tokens(n: int, t: int, dim: int = 8, seed: int = 0, min_valid: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded unit-norm token embeddings (n, t, dim) and masks with 1..t valid tokens, padding at the end
    and filled with large junk that must never count."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, t, dim, generator=g), dim=-1)
    lengths = torch.randint(min_valid, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return x.masked_fill(~mask[..., None], 5.0), mask


def _mean_best(x: torch.Tensor, xm: torch.Tensor, y: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
    """Mean over x's valid tokens of the best dot product with one of y's valid tokens, one at a time."""
    ys = [y[j] for j in range(len(y)) if ym[j]]
    best = [torch.stack([torch.dot(x[k], v) for v in ys]).max() for k in range(len(x)) if xm[k]]
    return torch.stack(best).mean()


def naive_filip(a, am, b, bm, scale, valid=None) -> torch.Tensor:
    """FILIP's loss written per sample pair, on the present samples only."""
    keep = [i for i in range(len(a)) if valid is None or valid[i]]
    if not keep:
        return torch.tensor(0.0)
    s_ab = torch.stack([torch.stack([_mean_best(a[i], am[i], b[j], bm[j]) for j in keep]) for i in keep])
    s_ba = torch.stack([torch.stack([_mean_best(b[j], bm[j], a[i], am[i]) for i in keep]) for j in keep])
    labels = torch.arange(len(keep))
    return (F.cross_entropy(scale * s_ab, labels) + F.cross_entropy(scale * s_ba, labels)) / 2


def with_grads(fn, a, b, scale: float = 7.0):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(a, b, s)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("absent", [None, [1], [0, 2, 3]])
@pytest.mark.parametrize("local_loss", [False, True])
def test_loss_and_grads_equal_the_naive_loop(seed: int, absent: list[int] | None, local_loss: bool) -> None:
    (a, am), (b, bm) = tokens(5, 4, seed=seed), tokens(5, 6, seed=seed + 10)
    valid = None
    if absent is not None:
        valid = torch.ones(5, dtype=torch.bool)
        valid[absent] = False
    mode = GatherMode("no_grad", local_loss)
    ours = with_grads(lambda x, y, s: filip_loss(x, am, y, bm, s, gather=mode, valid=valid)[0], a, b)
    ref = with_grads(lambda x, y, s: naive_filip(x, am, y, bm, s, valid), a, b)
    for name, o, r in zip(("loss", "grad a", "grad b", "grad scale"), ours, ref, strict=True):
        assert_close(o, r, name)
    # padding and absent samples get exactly no gradient
    assert torch.count_nonzero(ours[1][~am]) == 0 and torch.count_nonzero(ours[2][~bm]) == 0
    if valid is not None:
        assert torch.count_nonzero(ours[1][~valid]) == 0


def test_similarity_is_not_symmetric_and_ignores_padding() -> None:
    (a, am), (b, bm) = tokens(3, 5, seed=4), tokens(4, 3, seed=5)
    s_ab, s_ba = token_similarity(a, am, b, bm)
    assert s_ab.shape == s_ba.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert_close(s_ab[i, j], _mean_best(a[i], am[i], b[j], bm[j]), f"s_ab[{i},{j}]")
            assert_close(s_ba[i, j], _mean_best(b[j], bm[j], a[i], am[i]), f"s_ba[{i},{j}]")
    assert not torch.allclose(s_ab, s_ba)
    # A sample with no valid token scores 0 (finite) instead of the masking fill.
    bm0 = bm.clone()
    bm0[1] = False
    s_ab0, s_ba0 = token_similarity(a, am, b, bm0)
    assert torch.isfinite(s_ab0).all() and torch.isfinite(s_ba0).all()
    assert (s_ab0[:, 1] == 0).all() and (s_ba0[:, 1] == 0).all()


def test_accuracy_metrics() -> None:
    (a, am) = tokens(6, 4, seed=7)
    perfect = filip_loss(a, am, a, am, torch.tensor(10.0), gather=GatherMode())[1]
    assert perfect["acc"].item() == 1.0 and perfect["acc_ba"].item() == 1.0
    shifted = filip_loss(a, am, a.roll(1, 0), am.roll(1, 0), torch.tensor(10.0), gather=GatherMode())[1]
    assert shifted["acc"].item() == 0.0 and shifted["acc_ba"].item() == 0.0


def test_subsample_keeps_valid_tokens_first() -> None:
    x = torch.arange(2 * 6, dtype=torch.float).view(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    sx, sm = subsample_tokens(x, mask, 3, torch.Generator().manual_seed(0))
    assert sx.shape == (2, 3, 1) and sm.sum(1).tolist() == [3, 2]
    assert set(sx[0, :, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}  # row 0 drew 3 of its 4 valid tokens
    assert {6.0, 7.0} <= set(sx[1, :, 0].tolist())  # row 1 kept both of its valid tokens
    # each selected token keeps its own mask value
    assert (mask.gather(1, (sx[..., 0] - torch.tensor([[0.0], [6.0]])).long()) == sm).all()
    assert subsample_tokens(x, mask, 6)[0] is x


def test_filip_registered_and_validates_config() -> None:
    obj = objectives.build("filip", pairs=[["image", "text"]], max_tokens=8)
    assert isinstance(obj, FILIP) and obj.modalities == obj.token_modalities == ("image", "text")
    assert obj.no_weight_decay() == {"logit_scale"}
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="filip.max_tokens"):
            FILIP(pairs=[["image", "text"]], max_tokens=bad)
    with pytest.raises(ConfigError, match=r"filip.pairs\[0\]"):
        FILIP(pairs=[["text", "text"]])
    with pytest.raises(ConfigError, match="gather"):
        FILIP(pairs=[["image", "text"]], gather="all")
    with pytest.raises(ValueError, match="no token_embedding"):
        e = torch.zeros(2, 4)
        obj({"image": EncoderOutput(tokens=e[:, None], mask=None, pooled=e, embedding=e),
             "text": EncoderOutput(tokens=e[:, None], mask=None, pooled=e, embedding=e)},
            Batch(fields={}, present={}, keys=["0", "1"]))


# ---- real tiny towers: any two encoders that return tokens ---------------------------------------------


def _tiny_tower(name: str):
    kw = encoders.get(name).tiny_configs[0]
    return encoders.build(name, **kw), modalities.get(encoders.get(name).modality).from_encoder_config(**kw)


def _image_inputs(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 255, (40, 40, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def _audio_inputs(n: int) -> list:
    # clips of different lengths: the shorter ones end in padding frames their token mask hides
    g = torch.Generator().manual_seed(1)
    return [0.1 * torch.randn(int(4000 * (0.3 + 0.7 * i / n)), generator=g) for i in range(n)]


@pytest.mark.parametrize("other,inputs", [("image/vit", _image_inputs), ("audio/ast", _audio_inputs)])
def test_pretrainer_projects_tokens_and_filip_matches_the_loop(other: str, inputs) -> None:
    torch.manual_seed(0)
    n = 4
    tower, data = _tiny_tower(other)
    text, text_data = _tiny_tower("text/transformer")
    m = tower.modality
    model = MultimodalModel({m: tower, "text": text, "spare": _tiny_tower("text/transformer")[0]}, embed_dim=16,
                            data={m: data, "text": text_data})
    obj = FILIP(pairs=[[m, "text"]], init_logit_scale=5.0)
    pretrainer = Pretrainer(model, {"filip": obj})
    assert pretrainer.token_needed == (m, "text")
    words = ["a red circle", "a blue square on a background", "a star", "a large green ring at the top"]
    present = torch.tensor([True, True, False, True])
    batch = Batch(fields={m: data.prepare(inputs(n)), "text": text_data.prepare(words),
                          "spare": text_data.prepare(words)},
                  present={m: present}, keys=[str(i) for i in range(n)])
    outputs = pretrainer.embed(batch)
    assert "spare" not in outputs
    for side in (m, "text"):
        te = outputs[side].token_embedding
        assert te.shape[:2] == outputs[side].tokens.shape[:2] and te.shape[2] == 16
        assert_close(te.norm(dim=-1), torch.ones(te.shape[:2]), "unit tokens")
    masks = [outputs[s].mask if outputs[s].mask is not None else torch.ones(outputs[s].tokens.shape[:2], dtype=torch.bool)
             for s in (m, "text")]
    assert not masks[1].all(), "text tokens should include padding"
    if m == "audio":
        assert not masks[0].all(), "short clips should have masked tokens"
    out = pretrainer.loss(outputs, batch)
    ref = naive_filip(outputs[m].token_embedding, masks[0], outputs["text"].token_embedding, masks[1],
                      torch.tensor(5.0), present)
    assert_close(out["loss"], ref, "loss")
    assert {f"filip/{m}_text/acc", f"filip/text_{m}/acc", f"filip/{m}_text/logit_scale"} <= set(out["metrics"])
    out["loss"].backward()
    for side in (m, "text"):
        assert model.heads[side].weight.grad is not None and model.heads[side].weight.grad.abs().sum() > 0
    assert obj.logit_scale.grad is not None


def test_max_tokens_subsamples_in_training_only() -> None:
    (a, am), (b, bm) = tokens(4, 9, seed=2, min_valid=5), tokens(4, 7, seed=3, min_valid=5)
    outs = {"image": EncoderOutput(tokens=a, mask=am, pooled=a[:, 0], embedding=a[:, 0]),
            "text": EncoderOutput(tokens=b, mask=bm, pooled=b[:, 0], embedding=b[:, 0])}
    outs["image"].token_embedding, outs["text"].token_embedding = a, b
    batch = Batch(fields={}, present={}, keys=[str(i) for i in range(4)])
    obj = FILIP(pairs=[["image", "text"]], max_tokens=3, init_logit_scale=5.0).eval()
    assert_close(obj(outs, batch).loss, naive_filip(a, am, b, bm, torch.tensor(5.0)), "eval: every token")
    obj.train()
    torch.manual_seed(0)
    got = obj(outs, batch).loss
    torch.manual_seed(0)
    (sa, sam), (sb, sbm) = subsample_tokens(a, am, 3), subsample_tokens(b, bm, 3)
    assert sam.all() and sbm.all()
    assert_close(got, naive_filip(sa, sam, sb, sbm, torch.tensor(5.0)), "train: 3 random valid tokens a side")


# ---- two ranks (gloo), in the clip harness ---------------------------------------------------------



@pytest.fixture(scope="module")
def rank_results(objective_ranks) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each rank's filip scenarios from the shared 2-rank launch (conftest.py)."""
    return objective_ranks("filip")


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_two_ranks_equal_the_concatenated_batch(rank_results: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    a_glob, a_mask, b_glob, b_mask = ranks_worker.filip_global_tokens()
    world = ranks_worker.WORLD
    for gather, local_loss in ranks_worker.FILIP_MODES:
        for mask_name in ("unmasked", "some"):
            key = f"filip/{gather}/{int(local_loss)}/{mask_name}"
            res = [r[key] for r in rank_results]
            valid = ranks_worker.global_masks()[mask_name]
            ref = with_grads(lambda x, y, s, v=valid: naive_filip(x, a_mask, y, b_mask, s, v), a_glob, b_glob,
                             ranks_worker.SCALE)
            losses = torch.stack([r["loss"] for r in res])
            # without local_loss every rank holds the whole loss; with it, its share
            for got in ([losses.mean()] if local_loss else losses):
                assert_close(got, ref[0], f"{key} loss")
            if gather == "with_grad":
                # ranks average grads; each rank's feature grad already sums every rank's loss
                assert_close(torch.cat([r["grad_a"] for r in res]) / world, ref[1], f"{key} grad a")
                assert_close(torch.cat([r["grad_b"] for r in res]) / world, ref[2], f"{key} grad b")
                assert_close(torch.stack([r["grad_scale"] for r in res]).mean(), ref[3], f"{key} grad scale")
