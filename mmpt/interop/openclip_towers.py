"""mmpt's own image–text towers as an OpenCLIP model (``mmpt export --format openclip`` of e.g. ``clip-tiny``).

Two towers have an OpenCLIP equivalent, so their weights travel by name with nothing changed in mmpt's model:

- ``image/timm`` + a bias-free linear head -> OpenCLIP's ``TimmModel`` (``vision_cfg.timm_model_name``):
  the same timm trunk under ``visual.trunk.``, ``timm_pool: ''`` (timm's own default pooling, which is what
  ``forward_head(pre_logits=True)`` gives mmpt) and ``timm_proj: linear`` (``visual.head.proj``). OpenCLIP
  passes no constructor arguments to timm, so a trunk built with ``model_kwargs`` (clip-tiny's half-width
  ResNet) is described by a timm ``config.json`` (architecture + ``model_args``, timm's own writer) in the
  export folder and named ``local-dir:<that folder>``: timm (1.0.31 here; older releases may lack local-dir:
  models) builds it offline, without weights.
- ``text/transformer`` (causal, EOT or first-token pooling, OpenCLIP's BPE) + a bias-free linear head ->
  OpenCLIP's ``TextTransformer``: one name table (``attn.qkv`` is ``in_proj_weight`` packed q, k, v as
  ``nn.MultiheadAttention`` packs them; ``pos_embed`` (1, L, W) is ``positional_embedding`` (L, W); the
  head's (E, W) weight transposed is ``text_projection``). Pooling: mmpt takes the last real token, OpenCLIP
  the argmax id, the same place as EOT (49407) is the largest id a text holds (mmpt's mask id 49408 never
  comes from text). Vocabulary 49409 rows, as trained.

Anything else (other towers, other heads, a bidirectional or mean-pooled text tower, an ``hf:`` tokenizer,
objective parameters beyond the logit scale and bias) is refused with one line naming what is missing.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmpt.formats.state_dict import SHOWN
from mmpt.registry import ConfigError

FORMAT = "OpenCLIP export (--format openclip)"
ALTERNATIVE = "export with --format folder (any model, loaded by mmpt.load) or --format mmpt"
TIMM_FOLDER = "timm"  # the timm config.json of a trunk built with model_kwargs, inside the export folder
# (mmpt name below the text tower's block, OpenCLIP name below transformer.resblocks.<i>.)
TEXT_LAYER = (("norm1", "ln_1"), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
              ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"), ("mlp.0", "mlp.c_fc"), ("mlp.2", "mlp.c_proj"))
TEXT_TOP = (("token_embed.weight", "token_embedding.weight"), ("pos_embed", "positional_embedding"),
            ("norm.weight", "ln_final.weight"), ("norm.bias", "ln_final.bias"))
POOLS = {"eot": "argmax", "cls": "first"}  # mmpt text pool -> OpenCLIP pool_type


def refuse(what: str) -> ConfigError:
    """The one-line refusal: the format asked for, what is missing, the alternative."""
    return ConfigError(f"{FORMAT}: {what}; {ALTERNATIVE}")


def is_native(model: nn.Module) -> bool:
    """Whether the model's image and text towers are mmpt's own (not OpenCLIP modules)."""
    from mmpt.encoders.open_clip import OpenCLIPImageEncoder, OpenCLIPTextEncoder

    towers = model.model.encoders
    return not any(isinstance(t, (OpenCLIPImageEncoder, OpenCLIPTextEncoder)) for t in towers.values())


def _encoder_settings(cfg: Any, modality: str) -> dict[str, Any]:
    """The tower's constructor arguments: the config's, over the class defaults."""
    from mmpt.registry import encoders

    spec = dict(cfg.model.encoders[modality])
    params = inspect.signature(encoders.get(spec["name"]).__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **spec}


def _linear_head(model: nn.Module, modality: str) -> Tensor:
    head = model.model.heads[modality]
    if not isinstance(head, nn.Linear) or head.bias is not None:
        kind = "an MLP" if isinstance(head, nn.Sequential) else type(head).__name__
        raise refuse(f"OpenCLIP projects each tower with one bias-free linear map (model.head: linear); this "
                     f"model's {modality} head is {kind}")
    return head.weight


def _check_towers(model: nn.Module) -> None:
    towers = model.model.encoders
    names = {m: getattr(t, "registry_name", type(t).__name__) for m, t in towers.items()}
    if set(towers) != {"image", "text"}:
        raise refuse(f"OpenCLIP holds one image and one text tower; this model has {names}")
    if names["image"] != "image/timm":
        raise refuse(f"OpenCLIP has no equivalent of the image tower {names['image']} (it maps image/timm to its "
                     "timm_model_name towers, and image/open_clip to itself)")
    if names["text"] != "text/transformer":
        raise refuse(f"OpenCLIP has no equivalent of the text tower {names['text']} (it maps text/transformer and "
                     "text/open_clip)")


def _text_config(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """OpenCLIP's ``text_cfg`` of the text/transformer tower, or a refusal naming the setting it lacks."""
    from mmpt.nn.tokenizers import OpenCLIPTokenizer

    text = model.model.encoders["text"]
    settings = _encoder_settings(cfg, "text")
    block = text.trunk.blocks[0]
    tokenizer = getattr(model.model.data.get("text"), "tokenizer", None)
    if not isinstance(tokenizer, OpenCLIPTokenizer):
        raise refuse(f"OpenCLIP's TextTransformer tokenizes with its BPE (open_clip.get_tokenizer); this text tower "
                     f"uses tokenizer {settings.get('tokenizer')!r}")
    if not block.attn.causal:
        raise refuse("OpenCLIP's TextTransformer is causal without a padding mask; this text tower is bidirectional "
                     "(causal: false)")
    if text.pool not in POOLS:
        raise refuse(f"OpenCLIP pools text by EOT (argmax) or the first token; this text tower pools {text.pool!r}")
    eps = {m.eps for m in text.modules() if isinstance(m, nn.LayerNorm)}
    if eps != {1e-5}:
        raise refuse(f"OpenCLIP's TextTransformer uses LayerNorm eps 1e-5; this text tower uses {sorted(eps)}")
    hidden = block.mlp[0].out_features
    return {"context_length": text.context_length, "vocab_size": text.token_embed.num_embeddings,
            "width": text.width, "heads": block.attn.heads, "layers": len(text.trunk.blocks),
            "mlp_ratio": hidden / text.width, "pool_type": POOLS[text.pool], "proj_type": "linear",
            "proj_bias": False}


def _timm_name(model: nn.Module, out: Path, image_size: int, mean: list[float], std: list[float]) -> str:
    """OpenCLIP's ``timm_model_name`` of the image trunk: its timm name, or (built with arguments timm's name
    alone does not carry) ``local-dir:`` a timm config written under ``out``."""
    trunk = model.model.encoders["image"].trunk
    arch = trunk.pretrained_cfg.get("architecture") or type(trunk).__name__
    recorded = {k: v for k, v in getattr(trunk, "_model_args", {}).items() if k != "num_classes"}
    if not recorded:
        return arch
    try:
        from timm.models._hub import save_config_for_hf
    except ImportError as exc:  # pragma: no cover - timm too old for local-dir models
        raise refuse(f"the image trunk {arch} is built with model_kwargs {sorted(recorded)}, which OpenCLIP passes to "
                     "timm only through a local-dir: timm config; this timm cannot write one") from exc
    folder = out / TIMM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    data = {"input_size": (3, image_size, image_size), "mean": tuple(mean), "std": tuple(std),
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    save_config_for_hf(trunk, str(folder / "config.json"), data_config=data)
    args = json.loads((folder / "config.json").read_text()).get("model_args", {})
    lost = sorted(k for k in recorded if k not in args)
    if lost:
        raise RuntimeError(f"timm's config writer dropped model_kwargs {lost}")  # ours to fix, not the user's
    return f"local-dir:{folder.resolve()}"


def native_openclip(model: nn.Module, cfg: Any, out: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(OpenCLIP state dict, OpenCLIP model config, preprocess config) of a model with mmpt's own towers; a timm
    trunk built with ``model_kwargs`` gets its timm config written under ``out``. Refuses what OpenCLIP cannot
    express."""
    _check_towers(model)
    image_head, text_head = _linear_head(model, "image"), _linear_head(model, "text")
    text_cfg = _text_config(model, cfg)
    state = model.state_dict()
    scalars = {k: v for k, v in state.items() if k.startswith("objectives.")}
    kinds = sorted(k.rsplit(".", 1)[1] for k in scalars)
    if kinds not in (["logit_scale"], ["logit_bias", "logit_scale"]):
        shown = sorted(scalars)[:SHOWN]
        raise refuse(f"OpenCLIP holds one logit scale (and a SigLIP logit bias) besides its towers; this model's "
                     f"objectives hold {shown or 'none'} (one clip or siglip objective exports)")
    image = _encoder_settings(cfg, "image")
    size = int(image["image_size"])
    mean, std = [float(x) for x in image["mean"]], [float(x) for x in image["std"]]
    oc: dict[str, Tensor] = {}
    consumed = set(scalars) | {"model.heads.image.weight", "model.heads.text.weight"}

    def put(theirs: str, key: str) -> None:
        oc[theirs] = state[key]
        consumed.add(key)

    trunk, text = "model.encoders.image.trunk.", "model.encoders.text."
    for key in [k for k in state if k.startswith(trunk)]:
        put("visual.trunk." + key.removeprefix(trunk), key)
    for ours, theirs in TEXT_TOP:
        put(theirs, text + ours)
    for i in range(text_cfg["layers"]):
        prefix = f"{text}trunk.blocks.{i}."
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key.removeprefix(prefix)
            match = next(((o, t) for o, t in TEXT_LAYER if rest == o or rest.startswith(o + ".")), None)
            if match:
                put(f"transformer.resblocks.{i}.{match[1]}{rest.removeprefix(match[0])}", key)
    leftover = sorted(k for k in state if k not in consumed)
    if leftover:
        raise refuse(f"OpenCLIP's CLIP has no place for {len(leftover)} tensors of this model: {leftover[:SHOWN]}")
    oc["positional_embedding"] = oc["positional_embedding"].reshape(text_cfg["context_length"], text_cfg["width"])
    oc["visual.head.proj.weight"] = image_head
    oc["text_projection"] = text_head.T
    for key, value in scalars.items():
        oc[key.rsplit(".", 1)[1]] = value.reshape(())
    vision_cfg = {"image_size": size, "timm_model_name": _timm_name(model, out, size, mean, std),
                  "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear", "timm_proj_bias": False}
    model_cfg: dict[str, Any] = {"embed_dim": int(model.model.embed_dim), "vision_cfg": vision_cfg,
                                 "text_cfg": text_cfg, "quick_gelu": False}
    if "logit_bias" in kinds:
        model_cfg["init_logit_bias"] = float(oc["logit_bias"])
    preprocess = {"size": size, "mode": "RGB", "mean": mean, "std": std, "interpolation": "bicubic",
                  "resize_mode": "shortest", "fill_color": 0}
    return {k: v.detach() for k, v in oc.items()}, model_cfg, preprocess


@torch.no_grad()
def check_loads(model: nn.Module, out: Path, preprocess: dict[str, Any]) -> float:
    """Load the written folder with ``open_clip.create_model('local-dir:...')`` (strict) and compare both towers'
    embeddings with mmpt's on a small random batch; returns the max abs difference (raises past 1e-3)."""
    import open_clip

    oc = open_clip.create_model(f"local-dir:{out}").eval()
    size = preprocess["size"]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=gen)
    mean, std = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    ids, mask = model.model.data["text"].tokenizer.encode(["a photo", "a red square on a blue background"])
    ours = (model.model.encode("image", {"pixels": pixels}, normalize=False),
            model.model.encode("text", {"ids": ids, "mask": mask}, normalize=False))
    theirs = (oc.encode_image((pixels.float() / 255 - mean) / std), oc.encode_text(ids))
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    scale = max(float(a.abs().max()) for a in ours)
    if not diff <= 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"{out}: OpenCLIP's model gives other embeddings than mmpt's (max abs diff {diff:.3g})")
    return diff
