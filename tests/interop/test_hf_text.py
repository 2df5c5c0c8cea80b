"""``mmpt export --format hf-text``: the shipped MLM recipes (bert-mlm-tiny's pre-LN text tower, esm-mlm-tiny's
rotary protein tower; shrunk, weights perturbed so every LayerNorm and bias matters) load with
``AutoModelForMaskedLM`` and give mmpt's MLM logits on the same ids; the tokenizer maps with ``AutoTokenizer``;
what a MaskedLM class cannot hold exactly is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpt.registry import ConfigError

ATOL = 1e-5
INPUTS = {"text": ["a red circle on the left!", "hello, world", "a blue square!!"],
          "protein": ["MKTAYIAKQRQISFVKSHFSRQ", "LAGVSERTIDPKQNFYMHWC", "MKV"]}


def mlm_export(tmp_path: Path, recipe: str, modality: str, *sets: str, mlm: bool = True) -> tuple[torch.nn.Module, Path]:
    """(mmpt model, its export) of a shipped recipe, one 32-wide tower, every weight perturbed at random."""
    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    cfg = load_config(recipe, [f"model.encoders.{modality}.depth=2", f"model.encoders.{modality}.width=32",
                               f"model.encoders.{modality}.heads=2", *(["objectives.mlm.width=32"] if mlm else []),
                               *sets])
    torch.manual_seed(0)
    model = build_pretrainer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, write_export(model.state_dict(), cfg, tmp_path / f"{recipe}.safetensors")


def mmpt_logits(model: torch.nn.Module, modality: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tower = model.model.encoders[modality]
    return model.objectives["mlm"].logits(tower({"ids": ids, "mask": mask}).tokens, model.model)


@pytest.mark.parametrize("recipe,modality,cls,sets", [
    ("bert-mlm-tiny", "text", "MegatronBertForMaskedLM", ()),
    ("esm-mlm-tiny", "protein", "EsmForMaskedLM", ()),
    ("esm-mlm-tiny", "protein", "EsmForMaskedLM", ("objectives.mlm.tie=false", "objectives.mlm.vocab_size=33")),
])
def test_logits_match_automodel_for_masked_lm(tmp_path: Path, recipe: str, modality: str, cls: str,
                                              sets: tuple[str, ...]) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mmpt.interop.hf_text import export_hf_text

    model, export = mlm_export(tmp_path, recipe, modality, *sets)
    out, name = export_hf_text(export, tmp_path / "hf")
    assert name == cls
    hf = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == cls
    tok = model.model.data[modality].tokenizer
    ids, mask = tok.encode(INPUTS[modality])
    with torch.no_grad():
        ours = mmpt_logits(model, modality, ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits
    diff = (ours - theirs)[mask].abs().max().item()
    print(f"{recipe} {sets}: max abs logit diff {diff:.2e} (logits up to {ours.abs().max().item():.2f})")
    assert diff < ATOL
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    enc = hf_tok(INPUTS[modality], padding="max_length", max_length=tok.context_length, truncation=True,
                 return_tensors="pt")
    # the same ids on every real token (OpenCLIP pads with id 0, CLIPTokenizer with <|endoftext|>: masked out)
    assert torch.equal(enc["attention_mask"].bool(), mask) and torch.equal(enc["input_ids"][mask], ids[mask])
    assert hf_tok.mask_token_id == tok.mask_id


def test_hf_bert_tower_maps_by_prefix(tmp_path: Path) -> None:
    """A text/hf tower (a BertModel) with the mlm head is BertForMaskedLM when its config's LayerNorm eps is the
    head's; BERT's default 1e-12 is refused, naming both values."""
    from transformers import AutoModelForMaskedLM

    from mmpt.encoders.hf import TINY_BERT
    from mmpt.interop.hf_text import export_hf_text

    def tower(eps: float) -> str:
        config = {**TINY_BERT, "vocab_size": 49409, "layer_norm_eps": eps, "hidden_dropout_prob": 0.0}
        return ("model.encoders.text={name: text/hf, tokenizer: openclip-bpe, context_length: 24, pool: cls, "
                f"config: {config}}}")

    untied = ("objectives.mlm.tie=false", "objectives.mlm.vocab_size=49409")  # an HF tower has no token_embed
    model, export = mlm_export(tmp_path, "bert-mlm-tiny", "text", tower(1e-5), *untied)
    out, name = export_hf_text(export, tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    ids, mask = model.model.data["text"].tokenizer.encode(INPUTS["text"])
    with torch.no_grad():
        diff = (mmpt_logits(model, "text", ids, mask) - hf(input_ids=ids, attention_mask=mask.long()).logits)[mask]
    assert name == "BertForMaskedLM" and diff.abs().max().item() < ATOL
    _, export = mlm_export(tmp_path, "bert-mlm-tiny", "text", tower(1e-12), *untied)
    with pytest.raises(ConfigError, match=r"LayerNorm eps is 1e-05, the bert config's layer_norm_eps 1e-12; .*"
                                          "--format folder"):
        export_hf_text(export, tmp_path / "refused")


@pytest.mark.parametrize("recipe,sets,message", [
    ("bert-mlm-tiny", ("model.encoders.text.causal=true",), "causal attention"),
    ("protst-tiny", ("model.encoders.protein.depth=1",), "no mlm objective"),
])
def test_refusals_name_what_differs(tmp_path: Path, recipe: str, sets: tuple[str, ...], message: str) -> None:
    from mmpt.interop.hf_text import export_hf_text

    _, export = mlm_export(tmp_path, recipe, "text", *sets, mlm=recipe.endswith("mlm-tiny"))
    with pytest.raises(ConfigError, match=f"hf-text export: .*{message}.*; export --format folder"):
        export_hf_text(export, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
