"""mmpt: multimodal pretraining — pluggable modality encoders, shared objectives, DeepSpeed ZeRO,
WebDataset shards."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, device: str = "cpu", *, allow_nonfinite: bool = False) -> tuple[Any, dict[str, Any], Any]:
    """``model, transforms, tokenizer = mmpt.load(path)`` from an export or a run directory.

    An export or run directory is untrusted data: its config is checked against its tensors before anything
    is allocated, keys that would fetch weights are reset, and weights holding NaN/inf are refused unless
    ``allow_nonfinite``.
    """
    from mmpt.commands.export import load as _load

    return _load(path, device, allow_nonfinite=allow_nonfinite)


def create_model_and_transforms(path: str, device: str = "cpu", *, allow_nonfinite: bool = False) -> tuple[Any, Any, Any]:
    """``model, preprocess_train, preprocess_val`` of an mmpt export or run directory with OpenCLIP's API
    (``model.encode_image``, ``model.encode_text``, ``model.logit_scale``); see :mod:`mmpt.interop.api`."""
    from mmpt.interop.api import create_model_and_transforms as _create

    return _create(path, device, allow_nonfinite=allow_nonfinite)


def get_tokenizer(path: str) -> Any:
    """OpenCLIP-style callable tokenizer (``tokenizer(texts) -> ids``) of an mmpt export or run directory."""
    from mmpt.interop.api import get_tokenizer as _get

    return _get(path)


__all__ = ["load", "create_model_and_transforms", "get_tokenizer", "__version__"]
