"""OpenCLIP towers: any OpenCLIP architecture (ViT, ConvNeXt/timm, ModifiedResNet) as ``image/open_clip`` and
its text transformer as ``text/open_clip``, built by OpenCLIP's own tower builders so OpenCLIP weights load
exactly (``mmpt import openclip`` maps them; ``mmpt export --format openclip`` maps them back).

Both towers already end in OpenCLIP's projection to ``embed_dim``: an imported model uses ``model.head:
none``. The data sides are the ordinary image and text ones (pixels normalised on the batch, tokens with
an explicit padding mask), so these towers train in any recipe.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from torch import Tensor, nn

from mmpt.contracts import Encoder, EncoderOutput
from mmpt.encoders.image import OPENAI_MEAN, OPENAI_STD, PixelNorm
from mmpt.nn.layers import last_token
from mmpt.registry import ConfigError, closest, encoders

# Keys of an OpenCLIP model config that these towers understand; anything else (CoCa's multimodal_cfg,
# a typo) is refused rather than silently dropped.
MODEL_CFG_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "custom_text", "preprocess_cfg", "output_dict"}

# Two tiny architectures for the contract and ZeRO-3 tests (and the interop tests): OpenCLIP builds them
# from these configs exactly as it builds its registered names.
TINY_VIT = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_RESNET = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
               "text_cfg": TINY_VIT["text_cfg"]}


def _check_local(cfg: dict[str, Any], where: str) -> None:
    """Refuse any string in a model config that names a remote source (timm fetches hf-hub: configs even
    unpretrained): a config may come from a model file, which must not reach the network."""
    from mmpt.formats.export_file import REMOTE_PREFIXES

    for value in re.findall(r'"((?:[^"\\]|\\.)*)"', json.dumps(cfg)):
        if value.startswith(REMOTE_PREFIXES) or "://" in value:
            raise ConfigError(f"{where}: {value[:60]!r} names a remote source; OpenCLIP towers build from local "
                              "configs only")


def resolve_model_config(model_name: str, model_cfg: dict | None, where: str) -> dict[str, Any]:
    """The OpenCLIP model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...): ``model_cfg`` when given,
    else OpenCLIP's registered config of ``model_name``; checked, pretrained downloads switched off."""
    if model_cfg is None:
        _check_local({"model_name": model_name}, where)
        import open_clip

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ConfigError(f"{where}.model_name: unknown OpenCLIP architecture {model_name!r}"
                              f"{closest(model_name, open_clip.list_models())}; give a registered name "
                              "(open_clip.list_models()) or the config itself as model_cfg")
    cfg = copy.deepcopy(dict(model_cfg))
    _check_local(cfg, f"{where}.model_cfg")
    unknown = sorted(set(cfg) - MODEL_CFG_KEYS)
    if unknown:
        raise ConfigError(f"{where}.model_cfg: unsupported OpenCLIP config keys {unknown} (CoCa and other "
                          f"multimodal decoders are not towers); expected keys among {sorted(MODEL_CFG_KEYS)}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ConfigError(f"{where}.model_cfg: missing {key!r} (an OpenCLIP model config has embed_dim, "
                              "vision_cfg and text_cfg)")
    if cfg["vision_cfg"].get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # weights come from an import, never a download
    if cfg["text_cfg"].get("hf_model_name"):
        raise ConfigError(f"{where}.model_cfg.text_cfg.hf_model_name: OpenCLIP towers with a Hugging Face "
                          "text model are not supported here; use a text/hf tower for that text model")
    return cfg


def _build(builder_name: str, cfg: dict[str, Any], part: str, where: str) -> nn.Module:
    """One tower through OpenCLIP's own builder (so its module names and init are OpenCLIP's)."""
    from open_clip import model as oc_model

    builder = getattr(oc_model, builder_name)
    try:
        return builder(cfg["embed_dim"], dict(cfg[part]), quick_gelu=bool(cfg.get("quick_gelu", False)))
    except TypeError as exc:  # an unknown key in vision_cfg / text_cfg
        raise ConfigError(f"{where}.model_cfg.{part}: {exc}") from exc


def _load_pretrained(tower: nn.Module, path: str, part: str, where: str) -> None:
    from mmpt.formats.state_dict import read_state_dict

    state = tower_state(read_state_dict(path), part, tower.state_dict(), f"{where}.pretrained ({path})")
    tower.load_state_dict(state, strict=True)


def _check_size(value: int, cfg: dict[str, Any], key: str, default: int, where: str) -> None:
    expected = cfg.get(key, default)
    if value != expected:
        raise ConfigError(f"{where}.{key}: {value} does not match the OpenCLIP config's {key} {expected}; "
                          f"set it to {expected}")


@encoders.register("image/open_clip")
class OpenCLIPImageEncoder(Encoder):
    """An OpenCLIP image tower (ViT, timm ConvNeXt, ModifiedResNet) built by OpenCLIP's code; ``pooled`` is
    OpenCLIP's ``encode_image`` (projected to ``embed_dim``), ``tokens`` that vector as one token.

    Args:
        model_name: OpenCLIP architecture name (``open_clip.list_models()``), e.g. 'ViT-B-32', 'RN50',
            'convnext_base'. model_cfg: the OpenCLIP model config itself (embed_dim, vision_cfg, text_cfg),
            used instead of the registered one (imports write it, so a model file is self-contained).
        image_size: input side in pixels; must equal the config's vision_cfg.image_size.
        mean/std: normalisation applied to uint8 input on the batch (default: the config's preprocess_cfg,
            else OpenAI's). pretrained: a local OpenCLIP checkpoint (.safetensors, .pt, .bin) whose image
            tower is loaded (weights-only). train_crop_scale: area range of the training random-resized crop.
    """

    modality = "image"
    tiny_configs = ({"model_name": "tiny-vit", "model_cfg": TINY_VIT, "image_size": 32},)
    weight_sources = {"pretrained": ""}

    def __init__(self, model_name: str = "ViT-B-32", model_cfg: dict | None = None, image_size: int = 224,
                 mean: list | None = None, std: list | None = None, pretrained: str = "",
                 train_crop_scale: list = (0.9, 1.0)):
        super().__init__()
        where = "model.encoders.image"
        cfg = resolve_model_config(model_name, model_cfg, where)
        _check_size(image_size, cfg["vision_cfg"], "image_size", 224, where)
        self.visual = _build("_build_vision_tower", cfg, "vision_cfg", where)
        self.model_name, self.model_cfg = model_name, cfg  # what export --format openclip writes back
        self.width = int(cfg["embed_dim"])
        pre = cfg.get("preprocess_cfg") or {}
        self.mean = tuple(mean or pre.get("mean", OPENAI_MEAN))
        self.std = tuple(std or pre.get("std", OPENAI_STD))
        self.norm_in = PixelNorm(self.mean, self.std)
        if pretrained:
            _load_pretrained(self.visual, pretrained, "visual", where)

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        x = self.norm_in(inputs["pixels"], next(self.visual.parameters()).dtype)
        pooled = self.visual(x)
        # Per-token features exist only inside ViTs and at another width (before the projection, which is
        # a parameter of OpenCLIP's forward): the projected vector is the one token every arch offers.
        return EncoderOutput(tokens=pooled.unsqueeze(1), mask=None, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.visual, "no_weight_decay", None)
        own = {n for n, _ in self.visual.named_parameters()}
        return {f"visual.{n}" for n in (fn() if fn else ()) if n in own}


@encoders.register("text/open_clip")
class OpenCLIPTextEncoder(Encoder):
    """OpenCLIP's text transformer built by OpenCLIP's code; pooled at the last real token of the padding
    mask (OpenCLIP's argmax / eos pooling for its tokenizers, robust to the added mask id) and projected
    to ``embed_dim`` like ``encode_text``; ``tokens`` are every position projected.

    Args:
        model_name: OpenCLIP architecture name, e.g. 'ViT-B-32'. model_cfg: the OpenCLIP model config
            itself, used instead of the registered one. context_length: tokens per text; must equal the
            config's text_cfg.context_length. tokenizer: 'openclip-bpe' or 'hf:<folder>'.
        pretrained: a local OpenCLIP checkpoint (.safetensors, .pt, .bin) whose text tower is loaded
            (weights-only).
    """

    modality = "text"
    tiny_configs = ({"model_name": "tiny-vit", "model_cfg": TINY_VIT, "context_length": 16},)
    weight_sources = {"pretrained": ""}

    def __init__(self, model_name: str = "ViT-B-32", model_cfg: dict | None = None, context_length: int = 77,
                 tokenizer: str = "openclip-bpe", pretrained: str = ""):
        super().__init__()
        where = "model.encoders.text"
        cfg = resolve_model_config(model_name, model_cfg, where)
        text_cfg = cfg["text_cfg"]
        _check_size(context_length, text_cfg, "context_length", 77, where)
        if text_cfg.get("embed_cls"):
            raise ConfigError(f"{where}.model_cfg.text_cfg.embed_cls: CoCa's appended class token is not supported")
        self.pool = text_cfg.get("pool_type", "argmax")
        if self.pool not in ("argmax", "eos", "first", "last"):
            raise ConfigError(f"{where}.model_cfg.text_cfg.pool_type: expected argmax|eos|first|last, got {self.pool!r}")
        self.text = _build("_build_text_tower", cfg, "text_cfg", where)
        self.model_name, self.model_cfg = model_name, cfg
        # OpenCLIP pools by the ids (argmax finds EOT); with pool 'none' its forward returns every position
        # projected, and this tower pools by the padding mask instead (see the class docstring).
        self.text.pool_type = "none"
        self.width = int(cfg["embed_dim"]) if self.text.text_projection is not None else int(self.text.width)
        if pretrained:
            _load_pretrained(self.text, pretrained, "text", where)

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = inputs["ids"], inputs["mask"]
        tokens = self.text(ids)
        if self.pool in ("argmax", "eos"):
            pooled = last_token(tokens, mask)
        else:
            pooled = tokens[:, 0] if self.pool == "first" else tokens[:, -1]
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"text.{n}" for n in self.text.no_weight_decay()} | {"text.token_embedding.weight"}


def is_custom_text(state: dict[str, Tensor] | dict[str, Any]) -> bool:
    """OpenCLIP's CustomTextCLIP keeps its text tower under ``text.``; CLIP keeps it at the top level."""
    return any(k.startswith("text.") for k in state)


def tower_state(oc_state: dict[str, Tensor], part: str, expected: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """One tower's tensors (``part``: 'visual' or 'text') out of a whole OpenCLIP state dict, named as the
    tower's own state dict; the other tower's keys are ignored, missing or misshapen ones are refused."""
    prefix = "visual." if part == "visual" else ("text." if is_custom_text(oc_state) else "")
    names = {k: prefix + k for k in expected}
    from mmpt.formats.state_dict import take

    return take(oc_state, names, {k: tuple(v.shape) for k, v in expected.items()}, where, exhaustive=False)
