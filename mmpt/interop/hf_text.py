"""``mmpt export --format hf-text``: an MLM-trained text or protein tower as a Hugging Face ``*ForMaskedLM`` folder.

Which class holds our towers exactly (read from encoders/text.py, encoders/protein.py, mmpt/nn/layers.py and
objectives/masked.py):

* every from-scratch tower is **pre-LN** (x + attn(LN(x)), x + mlp(LN(x)), a final LN), exact-erf GELU, packed
  q/k/v with biases, LayerNorm eps 1e-5, no embedding LayerNorm and no token types. ``BertForMaskedLM`` is
  post-LN with an embedding LayerNorm, so it cannot hold them; ``MegatronBertForMaskedLM`` is BERT made pre-LN
  (no embedding LayerNorm, a final LN, learned positions 0..L-1 added to the token embedding): ``text/transformer``
  (bidirectional) maps to it, its one token type embedding set to zeros.
* ``protein/transformer`` is ESM-2 (rotary q/k in the half-split layout, base ``rope_base``): ``EsmForMaskedLM``
  with ``token_dropout`` off (ESM's rescaling of embeddings by the observed mask ratio is not ours).
* the MLM head (dense, GELU, LayerNorm, decoder tied to the input embedding, optional output bias) is BERT's and
  ESM's ``lm_head`` as is; an untied decoder exports with ``tie_word_embeddings: false``.
* ``text/hf`` and ``protein/hf`` towers are already a ``BertModel``/``EsmModel``: their weights map by prefix.

What differs (causal attention, another GELU, LayerNorm eps that one HF config cannot hold, a decoder of another
vocabulary size) is refused in one line naming it and the alternative format; nothing approximate is written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmpt.registry import ConfigError

ALTERNATIVE = "export --format folder (mmpt.load) or --format mmpt instead"


def refuse(what: str) -> ConfigError:
    """The one-line refusal: what differs, and the formats that hold the model as it is."""
    return ConfigError(f"hf-text export: {what}; {ALTERNATIVE}")


def mlm_objective(model: nn.Module) -> tuple[str, Any]:
    """(modality, objective) of the model's one masked-LM objective, or a refusal."""
    from mmpt.objectives.masked import MLM

    found = [(o.modality, o) for o in model.objectives.values() if isinstance(o, MLM)]
    if not found:
        raise refuse(f"the model has no mlm objective (objectives: {', '.join(model.objectives) or 'none'}), so no "
                     "masked-LM head for AutoModelForMaskedLM")
    if len({m for m, _ in found}) > 1:
        raise refuse(f"mlm objectives on several towers ({', '.join(m for m, _ in found)}); one tower is exported")
    return found[0]


def _eps(module: nn.Module, where: str) -> float:
    """The one LayerNorm eps of ``module`` (all its LayerNorms affine), or a refusal naming the mix."""
    norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    eps = {m.eps for m in norms}
    if len(eps) != 1 or not all(m.elementwise_affine and m.bias is not None for m in norms):
        raise refuse(f"{where}: LayerNorm eps {sorted(eps)} (affine: {[m.elementwise_affine for m in norms][:3]}); a "
                     "Hugging Face config holds one eps for affine LayerNorms")
    return eps.pop()


def _gelu_exact(module: nn.Module, where: str) -> None:
    odd = [m.approximate for m in module.modules() if isinstance(m, nn.GELU) and m.approximate != "none"]
    if odd:
        raise refuse(f"{where}: GELU approximate={odd[0]!r}; BERT and ESM heads use the exact (erf) GELU")


def head_state(objective: Any, embed: Tensor, prefix: dict[str, str]) -> tuple[dict[str, Tensor], bool]:
    """The MLM head's tensors under the HF names in ``prefix`` (dense, norm, decoder, bias) and whether it is tied."""
    dense, act, norm = objective.transform
    if not (isinstance(dense, nn.Linear) and isinstance(act, nn.GELU) and isinstance(norm, nn.LayerNorm)):
        raise refuse("the mlm head is not dense + GELU + LayerNorm")
    tied = objective.decoder is None
    weight = embed if tied else objective.decoder.weight
    if weight.shape != embed.shape:
        raise refuse(f"the mlm decoder predicts {weight.shape[0]} ids, the tower embeds {embed.shape[0]}; "
                     "a MaskedLM model's decoder covers its own vocabulary")
    bias = objective.bias if tied else objective.decoder.bias
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    state = {prefix["dense"] + ".weight": dense.weight, prefix["dense"] + ".bias": dense.bias,
             prefix["norm"] + ".weight": norm.weight, prefix["norm"] + ".bias": norm.bias,
             prefix["decoder"] + ".weight": weight, prefix["bias"]: bias}
    if prefix.get("decoder_bias"):
        state[prefix["decoder_bias"]] = bias
    return state, tied


def _blocks_state(trunk: nn.Module, layer: str, names: dict[str, str]) -> dict[str, Tensor]:
    """Per-block tensors of an mmpt pre-LN trunk under HF names (q/k/v split from the packed projection)."""
    out: dict[str, Tensor] = {}
    for i, block in enumerate(trunk.blocks):
        p = layer.format(i)
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        parts = {"norm1": block.norm1, "proj": block.attn.proj, "norm2": block.norm2, "fc1": block.mlp[0],
                 "fc2": block.mlp[2]}
        for ours, module in parts.items():
            out[f"{p}{names[ours]}.weight"], out[f"{p}{names[ours]}.bias"] = module.weight, module.bias
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{p}attention.self.{name}.weight"], out[f"{p}attention.self.{name}.bias"] = w, b
    return out


def _trunk_sizes(tower: nn.Module, where: str) -> dict[str, Any]:
    blocks = tower.trunk.blocks
    if not len(blocks) or any(not isinstance(b.mlp, nn.Sequential) or len(b.mlp) != 3 for b in blocks):
        raise refuse(f"{where}: the trunk is not mmpt's pre-LN Transformer blocks")
    _gelu_exact(tower, where)
    return {"hidden_size": tower.width, "num_hidden_layers": len(blocks), "num_attention_heads": blocks[0].attn.heads,
            "intermediate_size": blocks[0].mlp[0].out_features, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}


def megatron_text(tower: nn.Module, objective: Any, tokenizer: Any) -> tuple[Any, dict[str, Tensor]]:
    """``text/transformer`` (bidirectional) as ``MegatronBertForMaskedLM``: (config, state dict)."""
    from transformers import MegatronBertConfig

    where = "text/transformer"
    if any(b.attn.causal for b in tower.trunk.blocks):
        raise refuse(f"{where} has causal attention (causal: true); MaskedLM models attend both ways")
    sizes = _trunk_sizes(tower, where)
    eps = _eps(nn.ModuleList([tower, objective.transform]), f"{where} + mlm head")
    embed = tower.token_embed.weight
    names = {"norm1": "attention.ln", "proj": "attention.output.dense", "norm2": "ln", "fc1": "intermediate.dense",
             "fc2": "output.dense"}
    state = {"bert.embeddings.word_embeddings.weight": embed,
             "bert.embeddings.position_embeddings.weight": tower.pos_embed[0],
             "bert.embeddings.token_type_embeddings.weight": torch.zeros(1, tower.width),
             "bert.encoder.ln.weight": tower.norm.weight, "bert.encoder.ln.bias": tower.norm.bias,
             **_blocks_state(tower.trunk, "bert.encoder.layer.{}.", names)}
    head, tied = head_state(objective, embed, {"dense": "cls.predictions.transform.dense",
                                               "norm": "cls.predictions.transform.LayerNorm",
                                               "decoder": "cls.predictions.decoder", "bias": "cls.predictions.bias",
                                               "decoder_bias": "cls.predictions.decoder.bias"})
    config = MegatronBertConfig(vocab_size=embed.shape[0], max_position_embeddings=tower.context_length,
                                type_vocab_size=1, hidden_act="gelu", layer_norm_eps=eps,
                                pad_token_id=tokenizer.pad_id, tie_word_embeddings=tied, **sizes)
    return config, {**state, **head}


def esm_protein(tower: nn.Module, objective: Any, tokenizer: Any) -> tuple[Any, dict[str, Tensor]]:
    """``protein/transformer`` as ``EsmForMaskedLM`` with rotary positions: (config, state dict)."""
    from transformers import EsmConfig

    where = "protein/transformer"
    sizes = _trunk_sizes(tower, where)
    eps = _eps(nn.ModuleList([tower, objective.transform]), f"{where} + mlm head")
    bases = {float(b.attn.base) for b in tower.trunk.blocks}
    embed = tower.token_embed.weight
    names = {"norm1": "attention.LayerNorm", "proj": "attention.output.dense", "norm2": "LayerNorm",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
    state = {"esm.embeddings.word_embeddings.weight": embed,
             "esm.encoder.emb_layer_norm_after.weight": tower.norm.weight,
             "esm.encoder.emb_layer_norm_after.bias": tower.norm.bias,
             **_blocks_state(tower.trunk, "esm.encoder.layer.{}.", names)}
    head, tied = head_state(objective, embed, {"dense": "lm_head.dense", "norm": "lm_head.layer_norm",
                                               "decoder": "lm_head.decoder", "bias": "lm_head.bias"})
    config = EsmConfig(vocab_size=embed.shape[0], max_position_embeddings=tower.context_length,
                       position_embedding_type="rotary", rope_theta=bases.pop(), layer_norm_eps=eps,
                       emb_layer_norm_before=False, token_dropout=False, pad_token_id=tokenizer.pad_id,
                       mask_token_id=tokenizer.mask_id, tie_word_embeddings=tied, **sizes)
    return config, {**state, **head}


# HF towers (encoders/hf.py): model_type -> (base-model prefix, head names, whether the head's act follows hidden_act)
HF_FAMILIES = {
    "bert": ("bert.", {"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
                       "decoder": "cls.predictions.decoder", "bias": "cls.predictions.bias",
                       "decoder_bias": "cls.predictions.decoder.bias"}, True),
    "esm": ("esm.", {"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "decoder": "lm_head.decoder",
                     "bias": "lm_head.bias"}, False),
}


def hf_tower(tower: nn.Module, objective: Any, tokenizer: Any) -> tuple[Any, dict[str, Tensor]]:
    """A ``*/hf`` tower (a BertModel or EsmModel already) with the mlm head: its own config, weights by prefix."""
    import copy

    config = copy.deepcopy(tower.model.config)
    kind = getattr(config, "model_type", None)
    if kind not in HF_FAMILIES:
        raise refuse(f"the {tower.modality}/hf tower is a {kind!r} model; mapped: {', '.join(HF_FAMILIES)}")
    prefix, names, follows_act = HF_FAMILIES[kind]
    if follows_act and getattr(config, "hidden_act", "gelu") != "gelu":
        raise refuse(f"the {kind} config's hidden_act is {config.hidden_act!r}; its MLM head would use it, ours is "
                     "the exact GELU")
    if getattr(config, "token_dropout", False):
        raise refuse("the esm config sets token_dropout (ESM's embedding rescaling); the mmpt tower never applied it")
    head_eps = _eps(objective.transform, "mlm head")
    if head_eps != config.layer_norm_eps:
        raise refuse(f"the mlm head's LayerNorm eps is {head_eps}, the {kind} config's layer_norm_eps "
                     f"{config.layer_norm_eps}; its MaskedLM head would use the config's")
    _gelu_exact(objective.transform, "mlm head")
    embed = tower.model.get_input_embeddings().weight
    head, tied = head_state(objective, embed, names)
    config.tie_word_embeddings = tied
    return config, {**{prefix + k: v for k, v in tower.model.state_dict().items()}, **head}


def _mapper(tower: nn.Module) -> Any:
    from mmpt.encoders.hf import HFTower
    from mmpt.encoders.protein import ProteinTransformer
    from mmpt.encoders.text import TextTransformer

    if isinstance(tower, HFTower):
        return hf_tower
    if type(tower) is TextTransformer:
        return megatron_text
    if type(tower) is ProteinTransformer:
        return esm_protein
    raise refuse(f"the {tower.modality} tower is {type(tower).__name__}; mapped towers: text/transformer, "
                 "protein/transformer, text/hf and protein/hf (BERT, ESM)")


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """The tower's tokenizer as files AutoTokenizer reads, same ids on real tokens: an ``hf:`` folder's files;
    OpenCLIP's BPE as a ``CLIPTokenizer`` plus ``<mask>`` at its mask id; the ESM alphabet as an ``EsmTokenizer``."""
    from transformers import AutoTokenizer

    from mmpt.interop import hf_clip

    tokens = getattr(tokenizer, "tokens", None)
    if tokens is not None:  # a fixed alphabet (protein): one token a line, in id order
        from transformers import EsmTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.txt").write_text("\n".join(tokens) + "\n")
            EsmTokenizer(str(Path(tmp) / "vocab.txt"), model_max_length=tokenizer.context_length).save_pretrained(out)
        return
    hf_clip.save_tokenizer(tokenizer, out)
    if getattr(tokenizer, "_bpe", None) is None:
        return
    # OpenCLIP pads with id 0, the real token '!': made the pad token, every '!' in a text would tokenize as it.
    # CLIPTokenizer pads with <|endoftext|> instead, so ids differ only where attention_mask is 0.
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tok.add_special_tokens({"mask_token": "<mask>"})
    if tok.mask_token_id != tokenizer.mask_id:
        raise refuse(f"the tokenizer's mask token got id {tok.mask_token_id}, the model's is {tokenizer.mask_id}")
    tok.save_pretrained(out)


def export_hf_text(src: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write folder ``out`` that ``AutoModelForMaskedLM.from_pretrained`` loads (and ``AutoTokenizer``, where the
    tokenizer maps) from the mmpt model at ``src``; returns the folder and the MaskedLM class."""
    from transformers import AutoModelForMaskedLM

    from mmpt.interop.openclip import load_merged

    model = load_merged(src)
    modality, objective = mlm_objective(model)
    tower = model.model.encoders[modality]
    tokenizer = getattr(model.model.data.get(modality), "tokenizer", None)
    config, state = _mapper(tower)(tower, objective, tokenizer)
    hf_model = AutoModelForMaskedLM.from_config(config)
    expected = hf_model.state_dict()
    missing = [k for k in expected if k not in state and not _own_extra(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise refuse(f"{type(hf_model).__name__} keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                     f"of another shape {wrong[:3]})")
    with torch.no_grad():
        hf_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    out = Path(out)
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    info = {"source": str(src), "modality": modality, "class": type(hf_model).__name__}
    (out / "mmpt_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out, type(hf_model).__name__


def _own_extra(key: str) -> bool:
    """HF tensors our towers have no counterpart of and MaskedLM logits never read (ESM's contact head, the
    rotary frequencies it recomputes)."""
    return key.startswith("esm.contact_head.") or key.endswith("rotary_embeddings.inv_freq")
