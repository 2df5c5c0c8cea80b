"""mmpt: multimodal pretraining — pluggable modality encoders, shared objectives, DeepSpeed ZeRO,
WebDataset shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmpt.config import Config
    from mmpt.training.loop import RunSummary

__version__ = "0.1.0"
_YAML_DOCUMENT_END = "\n...\n"  # PyYAML ends a lone scalar with it


def load(path: str, device: str = "cpu", *, allow_nonfinite: bool = False) -> tuple[Any, dict[str, Any], Any]:
    """``model, transforms, tokenizer = mmpt.load(path)`` from an export or a run directory.

    An export or run directory is untrusted data: its config is checked against its tensors before anything
    is allocated, keys that would fetch weights are reset, and weights holding NaN/inf are refused unless
    ``allow_nonfinite``.
    """
    from mmpt.commands.export import load as _load

    return _load(path, device, allow_nonfinite=allow_nonfinite)


def train(config_or_recipe: str | Path | dict[str, Any] | Config, *, resume: str | None = None,
          **overrides: Any) -> RunSummary:
    """Train in this process and return the run's summary: ``mmpt train`` from Python.

    ``config_or_recipe`` is a shipped recipe name (``"clip-tiny"``), a YAML path, a config dict or a ``Config``.
    Each keyword argument sets one config key, its dots spelled ``__``, its value a Python value:
    ``mmpt.train("clip-tiny", train__steps=200, optim__lr=5e-4)`` is
    ``mmpt train clip-tiny --set train.steps=200 --set optim.lr=5e-4``. ``resume`` is ``--resume``: ``"latest"``
    (the newest checkpoint of ``train.out_dir``) or a run directory or checkpoint. One process needs no
    launcher; under ``torchrun`` every rank calls this with the same arguments.
    """
    from mmpt.config import Config, load_config
    from mmpt.training.loop import train as _train

    sets = [_override(key, value) for key, value in overrides.items()]
    if isinstance(config_or_recipe, Config):
        cfg = load_config(config_or_recipe.to_dict(), sets) if sets else config_or_recipe
    else:
        cfg = load_config(config_or_recipe, sets)
    return _train(cfg, resume=resume)


def _override(key: str, value: Any) -> str:
    """``train__steps=2`` as the ``--set`` item ``train.steps=2`` (the value written as one-line YAML)."""
    import math

    import yaml

    from mmpt.registry import ConfigError

    dotted = key.replace("__", ".")
    try:
        text = yaml.safe_dump(os.fspath(value) if isinstance(value, os.PathLike) else value,
                              default_flow_style=True, width=math.inf)
    except yaml.YAMLError:
        raise ConfigError(f"{dotted}: {type(value).__name__} is not a config value (expected a number, string, "
                          "bool, None, list or dict)") from None
    return f"{dotted}={text.removesuffix(_YAML_DOCUMENT_END).strip()}"


def create_model_and_transforms(path: str, device: str = "cpu", *, allow_nonfinite: bool = False) -> tuple[Any, Any, Any]:
    """``model, preprocess_train, preprocess_val`` of an mmpt export or run directory with OpenCLIP's API
    (``model.encode_image``, ``model.encode_text``, ``model.logit_scale``); see :mod:`mmpt.interop.api`."""
    from mmpt.interop.api import create_model_and_transforms as _create

    return _create(path, device, allow_nonfinite=allow_nonfinite)


def get_tokenizer(path: str) -> Any:
    """OpenCLIP-style callable tokenizer (``tokenizer(texts) -> ids``) of an mmpt export or run directory."""
    from mmpt.interop.api import get_tokenizer as _get

    return _get(path)


__all__ = ["load", "train", "create_model_and_transforms", "get_tokenizer", "__version__"]
