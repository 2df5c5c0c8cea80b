"""Hugging Face ``CLIPModel`` folders in and out of mmpt.

A ``CLIPModel`` is OpenAI's CLIP: the same modules as OpenCLIP's ViT image tower and text transformer, with
separate q/k/v projections where OpenCLIP packs them (``in_proj_weight``) and ``nn.Linear`` projections where
OpenCLIP keeps a (width, embed) matrix. So an HF model becomes an OpenCLIP config and state dict (one explicit
table of names, q/k/v concatenated, projections transposed: exact) and then an mmpt model through
:mod:`mmpt.interop.openclip`; export runs the table backwards and saves a folder
``CLIPModel.from_pretrained`` loads. Weights are read from safetensors, or ``pytorch_model.bin`` weights-only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmpt.formats.state_dict import SHOWN, take
from mmpt.interop.openclip import load_merged, mmpt_recipe, openclip_state, state_to_mmpt
from mmpt.registry import ConfigError

# (HF name, OpenCLIP name, how): 'same', 'T' (a Linear's weight is OpenCLIP's matrix transposed). Per-layer
# entries take the layer prefix of their tower; q/k/v are packed separately (QKV).
TOP = (("vision_model.embeddings.class_embedding", "visual.class_embedding", "same"),
       ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", "same"),
       ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", "same"),
       ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight", "same"),
       ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", "same"),
       ("vision_model.post_layernorm.weight", "visual.ln_post.weight", "same"),
       ("vision_model.post_layernorm.bias", "visual.ln_post.bias", "same"),
       ("visual_projection.weight", "visual.proj", "T"),
       ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", "same"),
       ("text_model.embeddings.position_embedding.weight", "positional_embedding", "same"),
       ("text_model.final_layer_norm.weight", "ln_final.weight", "same"),
       ("text_model.final_layer_norm.bias", "ln_final.bias", "same"),
       ("text_projection.weight", "text_projection", "T"),
       ("logit_scale", "logit_scale", "same"))
LAYER = tuple((f"{hf}.{p}", f"{oc}.{p}", "same") for hf, oc in (
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj")) for p in ("weight", "bias"))
QKV = (("self_attn.{}_proj.weight", "attn.in_proj_weight"), ("self_attn.{}_proj.bias", "attn.in_proj_bias"))
TOWERS = (("vision_model.encoder.layers.{}.", "visual.transformer.resblocks.{}.", "vision_config"),
          ("text_model.encoder.layers.{}.", "transformer.resblocks.{}.", "text_config"))
HF_ACTS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> OpenCLIP quick_gelu
HF_CONFIG_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "generation_config.json")


def _table(depths: dict[str, int]) -> list[tuple[str, str, str]]:
    """Every one-to-one (HF, OpenCLIP, how) name pair of a model with these layer counts."""
    rows = list(TOP)
    for hf_layer, oc_layer, part in TOWERS:
        for i in range(depths[part]):
            rows += [(hf_layer.format(i) + hf, oc_layer.format(i) + oc, how) for hf, oc, how in LAYER]
    return rows


def _qkv(depths: dict[str, int]) -> list[tuple[list[str], str]]:
    """([HF q, k, v names], packed OpenCLIP name) of every attention layer."""
    return [([hf_layer.format(i) + hf.format(c) for c in "qkv"], oc_layer.format(i) + oc)
            for hf_layer, oc_layer, part in TOWERS for i in range(depths[part]) for hf, oc in QKV]


def _depths(hf_config: dict[str, Any]) -> dict[str, int]:
    return {part: int(hf_config[part]["num_hidden_layers"]) for part in ("vision_config", "text_config")}


def hf_to_openclip(hf_state: dict[str, Tensor], hf_config: dict[str, Any], where: str) -> dict[str, Tensor]:
    """OpenCLIP-layout state dict of an HF CLIP state dict; leftover, missing or misshapen keys: one error."""
    depths = _depths(hf_config)
    rows, packs = _table(depths), _qkv(depths)
    names = {hf: hf for hf, _, _ in rows} | {n: n for group, _ in packs for n in group}
    shapes = {k: tuple(hf_state[k].shape) for k in names if k in hf_state}
    found = take(hf_state, names, shapes | {k: () for k in names if k not in shapes}, where)
    out = {oc: found[hf].T.contiguous() if how == "T" else found[hf] for hf, oc, how in rows}
    out.update({oc: torch.cat([found[n] for n in group]) for group, oc in packs})
    return out


def openclip_to_hf(oc_state: dict[str, Tensor], hf_config: dict[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`hf_to_openclip` (q/k/v split back, projections transposed back)."""
    depths = _depths(hf_config)
    out = {hf: oc_state[oc].T.contiguous() if how == "T" else oc_state[oc] for hf, oc, how in _table(depths)}
    for group, oc in _qkv(depths):
        out.update(zip(group, oc_state[oc].chunk(3), strict=True))
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def openclip_config(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
    """The OpenCLIP model config of an HF ``CLIPConfig`` dict (refusing what OpenCLIP's ViT cannot express)."""
    if hf_config.get("model_type") != "clip":
        raise ConfigError(f"{where}: model_type {hf_config.get('model_type')!r}; expected 'clip' (a CLIPModel)")
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(HF_ACTS):
        raise ConfigError(f"{where}: hidden_act {sorted(acts)}; expected one of {sorted(HF_ACTS)} for both towers")
    if vision.get("num_channels", 3) != 3:
        raise ConfigError(f"{where}: vision_config.num_channels {vision['num_channels']}; expected 3")

    def tower(cfg: dict[str, Any], part: str) -> dict[str, Any]:
        width, heads, hidden = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["intermediate_size"])
        if int(width * (hidden / width)) != hidden or width % heads:
            raise ConfigError(f"{where}: {part} hidden_size {width}, heads {heads}, intermediate_size {hidden} "
                              "cannot be expressed as an OpenCLIP tower")
        return {"width": width, "layers": int(cfg["num_hidden_layers"]), "mlp_ratio": hidden / width,
                "norm_kwargs": {"eps": float(cfg.get("layer_norm_eps", 1e-5))}, "heads": heads}

    v, t = tower(vision, "vision_config"), tower(text, "text_config")
    heads = v.pop("heads")
    eos = int(text.get("eos_token_id", 2))
    return {
        "embed_dim": int(hf_config.get("projection_dim", 512)), "quick_gelu": HF_ACTS[acts.pop()],
        "vision_cfg": {**v, "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
                       "head_width": v["width"] // heads},
        # HF pools the first eos_token_id (the argmax of the ids for legacy configs with eos id 2)
        "text_cfg": {**t, "context_length": int(text["max_position_embeddings"]), "vocab_size": int(text["vocab_size"]),
                     **({"pool_type": "argmax"} if eos == 2 else {"pool_type": "eos", "eos_id": eos})},
    }


def read_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, state dict) of a ``save_pretrained`` folder: safetensors (single or sharded) or a
    ``pytorch_model.bin`` read weights-only."""
    from mmpt.formats.state_dict import read_state_dict

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json (expected a folder written by CLIPModel.save_pretrained)")
    config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return config, read_state_dict(folder / "model.safetensors")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(folder / Path(shard).name))
        return config, state
    if (folder / "pytorch_model.bin").is_file():
        return config, read_state_dict(folder / "pytorch_model.bin")
    raise ConfigError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _tokenizer(folder: Path) -> str:
    """``hf:<folder>`` when the folder holds a tokenizer, else OpenCLIP's BPE (the same vocabulary), with a warning."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return f"hf:{folder.resolve()}"
    warnings.warn(f"{folder}: no tokenizer files (tokenizer.json, vocab.json); using OpenCLIP's BPE, CLIP's "
                  "vocabulary (save the CLIPProcessor into the folder to use its own)", stacklevel=3)
    return "openclip-bpe"


def import_hf_clip(folder: str | Path, out: str | Path) -> Path:
    """Write an mmpt export (``out``) from a Hugging Face ``CLIPModel`` folder."""
    from mmpt.commands.export import write_export

    folder = Path(folder)
    config, hf_state = read_folder(folder)
    model_cfg = openclip_config(config, str(folder / "config.json"))
    oc_state = hf_to_openclip(hf_state, config, str(folder))
    recipe = mmpt_recipe(f"hf-clip-{folder.name}", model_cfg, _tokenizer(folder))
    state, cfg = state_to_mmpt(oc_state, recipe, str(folder))
    return write_export(state, cfg, out, source=f"hf-clip:{folder.name}")


def _resolved(cfg: dict[str, Any], cls: Any, plain: set[str], part: str) -> tuple[Any, list[str]]:
    """(OpenCLIP's tower config with its defaults, ``part.key`` of every setting a CLIPModel cannot hold)."""
    import dataclasses

    defaults = dataclasses.asdict(cls())
    odd = [f"{part}.{k}" for k, v in cfg.items() if k not in plain and (k not in defaults or v != defaults[k])]
    return cls(**cfg), odd


def hf_config(model_cfg: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``CLIPConfig`` keyword arguments of an OpenCLIP config that a CLIPModel can hold; anything else is refused."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, odd_v = _resolved(model_cfg["vision_cfg"], CLIPVisionCfg, {"image_size", "layers", "width", "patch_size",
                                                                   "head_width", "mlp_ratio", "norm_kwargs"}, "vision_cfg")
    t, odd_t = _resolved(model_cfg["text_cfg"], CLIPTextCfg, {
        "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "eos_id", "pad_id",
        "pool_type", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs"}, "text_cfg")
    odd = odd_v + odd_t + ([] if t.pool_type in ("argmax", "eos") else ["text_cfg.pool_type"])
    if isinstance(v.layers, (list, tuple)) or odd:
        raise ConfigError(f"Hugging Face CLIP export needs a plain ViT image tower and text transformer (CLIPModel's "
                          f"layout); this model sets {odd[:SHOWN] or 'a ResNet image tower'}")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"

    def common(cfg: Any) -> dict[str, Any]:
        return {"hidden_size": cfg.width, "intermediate_size": int(cfg.width * cfg.mlp_ratio),
                "num_hidden_layers": cfg.layers, "hidden_act": act,
                "layer_norm_eps": float((cfg.norm_kwargs or {}).get("eps", 1e-5))}

    # HF pools the first eos_token_id; OpenCLIP's argmax finds the same place, EOT being the largest BPE id
    eos = t.eos_id if t.pool_type == "eos" else getattr(tokenizer, "eos_id", 49407)
    return {
        "projection_dim": int(model_cfg["embed_dim"]),
        "vision_config": {**common(v), "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_attention_heads": v.width // v.head_width},
        "text_config": {**common(t), "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "vocab_size": t.vocab_size, "eos_token_id": eos, "bos_token_id": getattr(tokenizer, "bos_id", 49406),
                        "pad_token_id": getattr(tokenizer, "pad_id", 0)},
    }


def export_hf_clip(src: str | Path, out: str | Path) -> Path:
    """Write folder ``out`` (``CLIPModel.from_pretrained`` loads it) from the mmpt model at ``src``; an ``hf:``
    tokenizer's files are copied along."""
    from transformers import CLIPConfig, CLIPModel

    model = load_merged(src)
    tokenizer = getattr(model.model.data.get("text"), "tokenizer", None)
    oc_state, _, model_cfg = openclip_state(
        model, "Hugging Face CLIP export (--format hf-clip)",
        alternative="; CLIPModel holds OpenCLIP's ViT towers only: export with --format openclip (it also maps "
                    "image/timm + text/transformer towers, e.g. clip-tiny) or --format folder")
    kwargs = hf_config(model_cfg, tokenizer)
    hf_model = CLIPModel(CLIPConfig(**kwargs))
    state = openclip_to_hf(oc_state, {k: kwargs[k] for k in ("vision_config", "text_config")})
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"Hugging Face CLIP export: keys do not match CLIPModel (missing {missing[:SHOWN]}, "
                          f"unexpected {unexpected[:SHOWN]})")
    out = Path(out)
    hf_model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Put the text tower's tokenizer into an HF folder: an ``hf:`` tokenizer's files are copied; OpenCLIP's BPE
    becomes a ``CLIPTokenizer`` (the same vocabulary and merges, HF's names for the two special tokens)."""
    from mmpt.formats.export_file import TOKENIZER_FILES

    folder = getattr(getattr(tokenizer, "_tok", None), "name_or_path", None)
    if folder and Path(folder).is_dir():
        folder = Path(folder)
        for name in TOKENIZER_FILES:
            if name not in HF_CONFIG_FILES and (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        return
    bpe = getattr(tokenizer, "_bpe", None)
    if bpe is None:
        warnings.warn(f"{out}: the text tower's tokenizer was not written (not an hf: folder or OpenCLIP's BPE)",
                      stacklevel=3)
        return
    from transformers import CLIPTokenizer

    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                      model_max_length=tokenizer.context_length).save_pretrained(out)
