"""ITM: hard-negative sampling (distribution, identity exclusion, guarded rows), the 3B loss against a
naive loop, the module end to end, and global negatives on 2 gloo ranks (shared launch, conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpt.contracts import Batch, EncoderOutput
from mmpt.objectives.matching import (
    ITM,
    identity_keys,
    input_fingerprints,
    itm_loss,
    same_item,
    sample_negatives,
)
from mmpt.registry import ConfigError

WIDTHS = {"text": 12, "image": 8}


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Chi-square quantile at p = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_negatives_follow_the_softmax_of_allowed_columns() -> None:
    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 3.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -2.0, 1.0, 1.0, 0.0, 2.5]])
    forbidden = torch.tensor([[True, False, False, False, False, True],
                              [False, True, False, True, False, False],
                              [False, False, True, False, False, False]])
    draws = 20_000
    idx, ok = sample_negatives(scores.repeat(draws, 1), forbidden.repeat(draws, 1))
    assert ok.all()
    idx = idx.view(draws, 3)
    for r in range(3):
        allowed = (~forbidden[r]).nonzero().squeeze(1)
        expected = torch.softmax(scores[r, allowed], 0) * draws
        counts = torch.bincount(idx[:, r], minlength=6).float()
        assert counts[forbidden[r]].sum() == 0, f"row {r} drew a forbidden column"
        chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
        assert chi2 < chi2_critical(len(allowed) - 1), (r, chi2, counts, expected)


def test_rows_without_any_allowed_column_are_guarded() -> None:
    scores = torch.randn(3, 4)
    forbidden = torch.zeros(3, 4, dtype=torch.bool)
    forbidden[1] = True
    idx, ok = sample_negatives(scores, forbidden)
    assert ok.tolist() == [True, False, True]
    assert idx.min() >= 0 and idx.max() < 4


def text_fields(captions: list[list[int]], length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, :len(c)] = torch.tensor(c)
    return {"ids": ids, "mask": ids != 0}


def test_identity_excludes_same_sample_duplicate_captions_and_source() -> None:
    # rows 0 and 2 share token ids; 1 and 3 share their caption text only in meta (case/space differ);
    # 4 and 5 share a source id; image pixels are all different.
    text = text_fields([[5, 6, 7], [8, 9], [5, 6, 7], [10, 11], [12], [13]])
    image = {"pixels": torch.arange(6 * 3 * 2 * 2, dtype=torch.uint8).view(6, 3, 2, 2)}
    meta = {"txt": [None, "A red  Circle", None, "a red circle", "x", "y"],
            "json": [{}, {}, {}, {}, {"src": "s1"}, {"src": "s1"}]}
    batch = Batch(fields={"text": text, "image": image}, present={}, keys=[str(i) for i in range(6)], meta=meta)
    keys = identity_keys(batch, ("text", "image"), "src", 0, 6)
    same = same_item(keys, keys)
    expected = torch.eye(6, dtype=torch.bool)
    for i, j in ((0, 2), (1, 3), (4, 5)):
        expected[i, j] = expected[j, i] = True
    assert torch.equal(same, expected)
    # and sampling never returns one of them, over many draws with the positives scored highest
    scores = torch.where(same, 10.0, 0.0).repeat(500, 1)
    idx, ok = sample_negatives(scores, same.repeat(500, 1))
    assert ok.all() and not same.repeat(500, 1)[torch.arange(3000), idx].any()


def test_fingerprints_ignore_trailing_padding_and_separate_fields() -> None:
    short = text_fields([[5, 6, 7], [5, 6, 8]], length=4)
    long = text_fields([[5, 6, 7], [5, 6, 8]], length=9)
    assert torch.equal(input_fingerprints(short), input_fingerprints(long))
    fp = input_fingerprints(short)
    assert not torch.equal(fp[0], fp[1])


def make_outputs(b: int, seed: int = 0, grad: bool = False) -> dict[str, EncoderOutput]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, 5, WIDTHS["text"], generator=g)
    text_mask = torch.arange(5)[None] < torch.randint(1, 6, (b, 1), generator=g)
    image = torch.randn(b, 4, WIDTHS["image"], generator=g)
    outs = {}
    for m, tok, mask in (("text", text, text_mask), ("image", image, None)):
        tok = tok.requires_grad_(grad)
        pooled = tok.mean(1)
        emb = F.normalize(pooled[:, :4], dim=-1)
        outs[m] = EncoderOutput(tokens=tok, mask=mask, pooled=pooled, embedding=emb)
    return outs


def tiny_itm(**kw) -> ITM:
    torch.manual_seed(0)
    return ITM(pairs=[["text", "image"]], widths=WIDTHS, width=16, depth=2, heads=2, **{"features": "tokens", **kw})


@pytest.mark.parametrize("balance", [False, True])
def test_itm_loss_equals_a_naive_per_sample_loop(balance: bool) -> None:
    b = 5
    itm = tiny_itm()
    outs = make_outputs(b)
    q, qm = outs["text"].tokens, outs["text"].mask
    k, km = outs["image"].tokens, torch.ones(b, 4, dtype=torch.bool)
    neg_k, neg_q = torch.tensor([1, 0, 4, 2, 3]), torch.tensor([2, 3, 0, 4, 1])
    weights = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float)
    fusion = itm.fusions["text__image"].eval()
    loss, logits, labels = itm_loss(fusion, q, qm, k, km, q, qm, k, km, neg_k, neg_q, weights, balance)

    terms, totals = {1: [], 0: []}, {1: 0.0, 0: 0.0}
    for i in range(b):
        cases = [((i, i), 1), ((i, int(neg_k[i])), 0), ((int(neg_q[i]), i), 0)]
        for c, ((qi, ki), label) in enumerate(cases):
            w = float(weights[c * b + i])
            # one sample at a time, its padding cut off: padding must not change anything
            n_real = int(qm[qi].sum())
            out = fusion(q[qi:qi + 1, :n_real], qm[qi:qi + 1, :n_real], k[ki:ki + 1], km[ki:ki + 1])
            terms[label].append(w * F.cross_entropy(out, torch.tensor([label])))
            totals[label] += w
    if balance:  # each class half the loss
        naive = (torch.stack(terms[1]).sum() / totals[1] + torch.stack(terms[0]).sum() / totals[0]) / 2
    else:
        naive = (torch.stack(terms[1]).sum() + torch.stack(terms[0]).sum()) / (totals[1] + totals[0])
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [1] * b + [0] * (2 * b)


def test_module_trains_and_guards_a_batch_of_one_caption() -> None:
    b = 6
    itm = tiny_itm()
    outs = make_outputs(b, grad=True)
    fields = {"text": text_fields([[3, 4]] * 3 + [[5], [6], [7]]), "image": {"pixels": torch.rand(b, 3, 2, 2)}}
    present = {"text": torch.tensor([True] * 5 + [False]), "image": torch.ones(b, dtype=torch.bool)}
    out = itm(outs, Batch(fields=fields, present=present, keys=[str(i) for i in range(b)]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert outs["text"].tokens.grad.abs().sum() > 0 and outs["image"].tokens.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in itm.parameters() if p.grad is not None)
    assert set(out.metrics) >= {"text_image/acc", "text_image/no_negative", "text_image/negative_sim"}

    # every sample carries the same caption: no negative anywhere, only the positives count
    same = {"text": text_fields([[3, 4]] * b), "image": fields["image"]}
    outs = make_outputs(b, grad=True)
    out = itm(outs, Batch(fields=same, present={}, keys=[str(i) for i in range(b)]))
    assert out.metrics["text_image/no_negative"] == 2 * b
    out.loss.backward()
    assert torch.isfinite(outs["text"].tokens.grad).all()


def test_random_negatives_ignore_similarity() -> None:
    itm = tiny_itm(negatives="random")
    assert itm.negatives == "random"
    with pytest.raises(ConfigError, match="itm.negatives"):
        tiny_itm(negatives="hardest")


def test_hard_warmup_ramps_from_random_to_hard_and_counts_training_forwards() -> None:
    itm = tiny_itm(hard_warmup=4, negative_logit_scale=10.0)
    batch = Batch(fields={}, present={}, keys=["a", "b", "c"])
    scales = [float(itm(make_outputs(3), batch).metrics["text_image/negative_scale"]) for _ in range(6)]
    assert scales == [0.0, 2.5, 5.0, 7.5, 10.0, 10.0]
    itm.eval()
    itm(make_outputs(3), batch)
    assert int(itm.step) == 6  # eval forwards do not advance it
    assert tiny_itm(negatives="random").negative_scale() == 0.0
    with pytest.raises(ConfigError, match="itm.hard_warmup"):
        tiny_itm(hard_warmup=-1)


def test_width_mismatch_names_the_key() -> None:
    itm = ITM(pairs=[["text", "image"]], widths={"text": 12, "image": 9}, width=16, depth=1, heads=2, features="tokens")
    with pytest.raises(ConfigError, match=r"itm.widths.image: 9, but the 'image' tokens are 8 wide"):
        itm(make_outputs(3), Batch(fields={}, present={}, keys=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="itm.widths.image"):
        ITM(pairs=[["text", "image"]], widths={"text": 12})


def test_default_features_are_the_projected_tokens() -> None:
    """By default the fusion reads ``token_embedding`` (asked for through token_modalities), not the raw tokens."""
    itm = ITM(pairs=[["text", "image"]], widths={"text": 4, "image": 4}, width=8, depth=1, heads=2)
    assert set(itm.token_modalities) == {"text", "image"}
    outs = make_outputs(3)
    with pytest.raises(ValueError, match="no token_embedding"):
        itm(outs, Batch(fields={}, present={}, keys=["a", "b", "c"]))
    for o in outs.values():
        o.token_embedding = F.normalize(o.tokens[..., :4], dim=-1)
    assert torch.isfinite(itm(outs, Batch(fields={}, present={}, keys=["a", "b", "c"])).loss)
    head = torch.nn.Linear(WIDTHS["text"], 4, bias=False)
    model = torch.nn.Module()
    model.heads = torch.nn.ModuleDict({"text": head})
    torch.testing.assert_close(itm.project(model, "text", outs["text"].tokens),
                               F.normalize(head(outs["text"].tokens), dim=-1))


def test_match_logit_takes_either_order() -> None:
    itm = tiny_itm().eval()
    outs = make_outputs(4)
    a = itm.match_logit({"text": (outs["text"].tokens, outs["text"].mask), "image": (outs["image"].tokens, None)})
    b = itm.match_logit({"image": (outs["image"].tokens, None), "text": (outs["text"].tokens, outs["text"].mask)})
    assert a.shape == (4,)
    torch.testing.assert_close(a, b)


def test_global_hard_negatives_on_two_ranks(objective_ranks) -> None:
    """Every rank draws negatives from the global batch; the gradient of rank 1's loss reaches rank 0's
    tokens (rank 0's own loss is multiplied by 0), and drawn negatives never repeat a caption."""
    results = objective_ranks("itm")
    r0, r1 = (r["itm/global"] for r in results)
    assert r0["loss"].isfinite() and r1["loss"].isfinite()
    assert r0["grad_text"].abs().sum() > 0 and r0["grad_image"].abs().sum() > 0
    assert r0["drawn_other_rank"] > 0 and r1["drawn_other_rank"] > 0
    assert r0["drawn_same_caption"] == 0 and r1["drawn_same_caption"] == 0
    assert r0["forbids_duplicate"] and r1["forbids_duplicate"]  # the other rank's copy of its caption
    # with local negatives, rank 0's tokens get nothing from rank 1
    assert results[0]["itm/local"]["grad_text"].abs().sum() == 0


def test_rerank_reorders_the_top_k_only() -> None:
    from mmpt.eval.retrieval import rerank_top_k

    sims = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.4, 0.6, 0.8, 1.0]])
    itm = {(0, 0): -1.0, (0, 3): 2.0, (0, 2): 5.0, (1, 4): 0.0, (1, 3): 1.0, (1, 2): -3.0}

    def pair_score(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return torch.tensor([itm[(int(r), int(c))] for r, c in zip(rows, cols, strict=True)])

    order = rerank_top_k(sims, 3, pair_score).argsort(dim=1, descending=True)
    assert order.tolist() == [[2, 3, 0, 4, 1], [3, 4, 2, 1, 0]]
    # BLIP-style: the similarity (weighted) added to the matching score of each re-scored pair
    order = rerank_top_k(sims, 3, pair_score, similarity=30.0).argsort(dim=1, descending=True)
    assert order.tolist() == [[0, 3, 2, 4, 1], [4, 3, 2, 1, 0]]


def test_a_perfect_reranker_lifts_r1_to_contrastive_recall_at_k() -> None:
    from mmpt.eval.retrieval import recall_at_k, rerank_top_k

    g = torch.Generator().manual_seed(3)
    q, c = F.normalize(torch.randn(40, 8, generator=g), dim=-1), F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    rel = lambda r: torch.eye(40, dtype=torch.bool)[r]  # noqa: E731
    plain = recall_at_k(q, c, rel, (1, 5))[0]
    perfect = recall_at_k(q, c, rel, (1, 5), chunk=16, scores=lambda r: rerank_top_k(
        q[r] @ c.T, 5, lambda qi, ci: (qi + r.start == ci).float()))[0]
    assert plain[1] < plain[5]
    assert perfect[1] == pytest.approx(plain[5]) and perfect[5] == pytest.approx(plain[5])


def test_rerank_needs_the_model_objectives(tmp_path) -> None:
    from shardkit import write_color_shards

    from mmpt.eval import build_tasks

    pattern = write_color_shards(tmp_path, (4,))[0]
    [(_, task)] = build_tasks([{"name": "retrieval", "data": pattern, "rerank": "itm"}])
    assert task.uses_objectives  # run_tasks hands it the Pretrainer
    with pytest.raises(ConfigError, match="rerank: 'itm' is an objective of the model, but only its towers"):
        task._matcher(None)
    with pytest.raises(ConfigError, match=r"not a matching objective of this model \(matching objectives: none\)"):
        task._matcher({"clip": torch.nn.Module()})
    assert not build_tasks([{"name": "retrieval", "data": pattern}])[0][1].uses_objectives
    with pytest.raises(ConfigError, match="rerank_k"):
        build_tasks([{"name": "retrieval", "data": pattern, "rerank": "itm", "rerank_k": 0}])
