"""OpenCLIP checkpoints in and out of mmpt.

``import_openclip`` turns an OpenCLIP state dict into an mmpt export whose towers are ``image/open_clip`` and
``text/open_clip`` (OpenCLIP's own modules, so every tensor keeps its name below the tower) and whose CLIP
objective holds the logit scale; ``export_openclip`` writes the inverse, a file that
``open_clip.create_model(NAME, pretrained=FILE)`` loads. Names are mapped explicitly, one rule per tower, and
any key left over on either side stops the conversion with one message listing them: never a partial load.
A model with mmpt's own towers (``clip-tiny``: ``image/timm`` + ``text/transformer``) exports to OpenCLIP's
local-dir: folder through :mod:`mmpt.interop.openclip_towers`.
Checkpoints are data: safetensors, or ``torch.load`` with ``weights_only=True`` (``mmpt.formats.safe_load``).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmpt.encoders.open_clip import is_custom_text
from mmpt.formats.state_dict import SHOWN, listed_keys, read_state_dict, take
from mmpt.registry import ConfigError

IMAGE_TOWER = "model.encoders.image.visual."
TEXT_TOWER = "model.encoders.text.text."
SCALARS = (".logit_scale", ".logit_bias")  # OpenCLIP's top-level scalars, held by the mmpt objective


def openclip_names(mmpt_keys: list[str], custom_text: bool) -> tuple[dict[str, str], list[str]]:
    """``{mmpt key: OpenCLIP key}`` for an imported model's keys, and the mmpt keys with no OpenCLIP name."""
    text_prefix = "text." if custom_text else ""
    names, unnamed = {}, []
    for key in mmpt_keys:
        if key.startswith(IMAGE_TOWER):
            names[key] = "visual." + key.removeprefix(IMAGE_TOWER)
        elif key.startswith(TEXT_TOWER):
            names[key] = text_prefix + key.removeprefix(TEXT_TOWER)
        elif key.startswith("objectives.") and key.endswith(SCALARS):
            names[key] = key.rsplit(".", 1)[1]
        else:
            unnamed.append(key)
    return names, unnamed


def mmpt_recipe(name: str, model_cfg: dict[str, Any], tokenizer: str = "openclip-bpe") -> dict[str, Any]:
    """The mmpt recipe of an OpenCLIP model: both towers carry its whole config (a self-contained file)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    common = {"model_name": name, "model_cfg": model_cfg}
    objective = "clip" if model_cfg.get("init_logit_bias") is None else "siglip"
    return {
        "name": f"openclip-{name}",
        "model": {"embed_dim": int(model_cfg["embed_dim"]), "head": "none", "encoders": {
            "image": {"name": "image/open_clip", **common, "image_size": vision.get("image_size", 224)},
            "text": {"name": "text/open_clip", **common, "context_length": text.get("context_length", 77),
                     "tokenizer": tokenizer}}},
        # OpenCLIP's SigLIP models carry a logit bias: mmpt's siglip objective holds the same two scalars
        "objectives": {objective: {"name": objective, "pairs": [["image", "text"]]}},
    }


def _tokenizer_for(name: str, model_cfg: dict[str, Any], tokenizer: str | None, where: str) -> str:
    """The mmpt tokenizer of an OpenCLIP architecture, chosen as ``open_clip.get_tokenizer`` chooses: the config's
    Hugging Face tokenizer, SigLIP's for names containing 'siglip', else OpenCLIP's BPE."""
    hf_name = model_cfg["text_cfg"].get("hf_tokenizer_name") or ("SigLIP's" if "siglip" in name.lower() else "")
    if tokenizer:
        cleaning = model_cfg["text_cfg"].get("tokenizer_kwargs")
        if cleaning:
            warnings.warn(f"{where}: OpenCLIP cleans texts with {cleaning} before tokenizing; {tokenizer} does not, "
                          "so texts with capitals or punctuation may tokenize differently", stacklevel=3)
        return tokenizer
    if hf_name:
        raise ConfigError(f"{where}: this architecture tokenizes with {hf_name!r} (Hugging Face); download that "
                          "tokenizer once and pass --tokenizer hf:<its local folder>")
    return "openclip-bpe"


def state_to_mmpt(oc_state: dict[str, Tensor], recipe: dict[str, Any], where: str) -> tuple[dict[str, Tensor], Any]:
    """(mmpt state, config) of an OpenCLIP-layout state dict for ``recipe``: the model is built once to know
    every name and shape it expects."""
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    cfg = load_config(recipe)
    expected = build_pretrainer(cfg).state_dict()
    names, unnamed = openclip_names(list(expected), is_custom_text(oc_state))
    if unnamed:  # the recipe is ours: this is a bug, not a user error
        raise RuntimeError(f"mmpt keys without an OpenCLIP name: {unnamed[:SHOWN]}")
    state = take(oc_state, names, {k: tuple(v.shape) for k, v in expected.items()}, where)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, cfg


def import_openclip(model: str, weights: str | Path, out: str | Path, *, model_config: str | None = None,
                    tokenizer: str | None = None) -> Path:
    """Write an mmpt export (``out``) from an OpenCLIP checkpoint of architecture ``model``; ``model_config``
    (a JSON file or folder) is registered with OpenCLIP first, as ``open_clip.add_model_config`` does."""
    from mmpt.commands.export import write_export
    from mmpt.encoders.open_clip import resolve_model_config

    if model_config:
        import open_clip

        if not Path(model_config).exists():
            raise ConfigError(f"--model-config {model_config}: no such file or folder")
        open_clip.add_model_config(model_config)
    model_cfg = resolve_model_config(model, None, "--model")
    recipe = mmpt_recipe(model, model_cfg, _tokenizer_for(model, model_cfg, tokenizer, f"--model {model}"))
    state, cfg = state_to_mmpt(read_state_dict(weights), recipe, str(weights))
    return write_export(state, cfg, out, source=f"openclip:{model}:{Path(weights).name}")


def openclip_state(model: torch.nn.Module, fmt: str = "OpenCLIP export", *,
                   alternative: str = "") -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """(OpenCLIP state dict, architecture name, OpenCLIP config) of a loaded mmpt model whose towers are
    ``image/open_clip`` and ``text/open_clip`` of one config, with ``model.head: none``; refusals name ``fmt``
    and end with ``alternative``."""
    from mmpt.encoders.open_clip import OpenCLIPImageEncoder, OpenCLIPTextEncoder

    towers = model.model.encoders
    image, text = towers["image"] if "image" in towers else None, towers["text"] if "text" in towers else None
    if not isinstance(image, OpenCLIPImageEncoder) or not isinstance(text, OpenCLIPTextEncoder):
        got = {m: getattr(t, "registry_name", type(t).__name__) for m, t in towers.items()}
        raise ConfigError(f"{fmt} needs towers image: image/open_clip and text: text/open_clip (OpenCLIP's own "
                          f"modules, e.g. from mmpt import openclip|hf-clip), got {got}{alternative}")
    if image.model_cfg["vision_cfg"] != text.model_cfg["vision_cfg"] or image.model_cfg["text_cfg"] != \
            text.model_cfg["text_cfg"] or image.model_cfg["embed_dim"] != text.model_cfg["embed_dim"]:
        raise ConfigError(f"{fmt}: the image tower ({image.model_name}) and the text tower "
                          f"({text.model_name}) come from different OpenCLIP configs; one file holds one model")
    state = model.state_dict()
    names, unnamed = openclip_names(list(state), bool(image.model_cfg.get("custom_text")))
    scalars = sorted(names[k] for k in names if k.startswith("objectives."))
    if unnamed or scalars.count("logit_scale") != 1 or scalars.count("logit_bias") > 1:
        raise ConfigError(f"{fmt}: {listed_keys('mmpt keys have no OpenCLIP name', unnamed)} and objective "
                          f"scalars {scalars} (expected model.head: none and one clip or siglip objective)")
    shape = [1] if image.model_cfg.get("nonscalar_logit_scale") else []
    out = {oc: state[k].reshape(shape) if oc in ("logit_scale", "logit_bias") else state[k] for k, oc in names.items()}
    return out, image.model_name, image.model_cfg


def save_state(state: dict[str, Tensor], out: str | Path) -> Path:
    """A state dict as ``.safetensors`` (preferred) or, for any other suffix, ``torch.save`` (what OpenCLIP reads)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
    else:
        torch.save(tensors, tmp)
    tmp.replace(out)
    return out


def load_merged(src: str | Path) -> torch.nn.Module:
    """The model of an mmpt export, or of a run directory exported first (LoRA adapters merged into their base
    weights, as ``mmpt export`` does), in eval mode."""
    return load_merged_config(src)[0]


def load_merged_config(src: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, config) of :func:`load_merged`'s source: the config embedded in the export."""
    from mmpt.commands.export import export, export_config, load
    from mmpt.formats.export_file import read_header

    if Path(src).is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            return load_merged_config(export(src, Path(tmp) / "model.safetensors"))
    return load(src)[0], export_config(src, read_header(src)[0])


def export_openclip(src: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write the mmpt model at ``src`` (export file or run directory) for OpenCLIP; returns the path and the call
    that loads it. A file (``.safetensors``, ``.pt``, ``.bin``) loads with ``open_clip.create_model(NAME,
    pretrained=out)``, NAME the architecture it was built from; a path without suffix becomes OpenCLIP's
    self-contained folder (``open_clip_config.json`` with the model and preprocess configs, and
    ``open_clip_model.safetensors``) that ``open_clip.create_model('local-dir:<out>')`` loads."""
    import open_clip

    from mmpt.interop.openclip_towers import FORMAT, is_native

    model, cfg = load_merged_config(src)
    out = Path(out)
    if is_native(model):
        return export_native(model, cfg, out)
    state, name, model_cfg = openclip_state(model, FORMAT)
    if out.suffix:
        if name not in open_clip.list_models():
            warnings.warn(f"{name!r} is not a registered OpenCLIP architecture: register its config with "
                          "open_clip.add_model_config, or export to a folder (--out DIR, OpenCLIP's local-dir: "
                          "format, which carries the config)", stacklevel=2)
        return save_state(state, out), f"open_clip.create_model({name!r}, pretrained={str(out)!r})"
    image = model.model.encoders["image"]
    preprocess = {**(model_cfg.get("preprocess_cfg") or {}), "mean": list(image.mean), "std": list(image.std)}
    config = {"model_cfg": {k: v for k, v in model_cfg.items() if k != "preprocess_cfg"}, "preprocess_cfg": preprocess}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    save_state(state, out / "open_clip_model.safetensors")
    return out, f"open_clip.create_model('local-dir:{out}')"


def export_native(model: torch.nn.Module, cfg: Any, out: Path) -> tuple[Path, str]:
    """OpenCLIP's local-dir: folder of a model with mmpt's own towers (:mod:`mmpt.interop.openclip_towers`),
    checked by loading it with OpenCLIP and comparing embeddings before returning."""
    from mmpt.interop.openclip_towers import check_loads, native_openclip, refuse

    if out.suffix:
        raise refuse(f"--out {out}: a single file loads only under an OpenCLIP architecture name, and this model's "
                     "towers have none; give a folder (--out DIR without a suffix: OpenCLIP's local-dir: format, "
                     "which carries the config)")
    out.mkdir(parents=True, exist_ok=True)
    state, model_cfg, preprocess = native_openclip(model, cfg, out)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=1))
    save_state(state, out / "open_clip_model.safetensors")
    check_loads(model, out, preprocess)
    return out, f"open_clip.create_model_and_transforms('local-dir:{out}')"
