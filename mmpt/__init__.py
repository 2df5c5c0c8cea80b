"""mmpt: multimodal pretraining — pluggable modality encoders, shared objectives, DeepSpeed ZeRO,
WebDataset shards."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, device: str = "cpu") -> tuple[Any, dict[str, Any], Any]:
    """``model, transforms, tokenizer = mmpt.load(path)`` from an export or a run directory."""
    from mmpt.export import load as _load

    return _load(path, device)


__all__ = ["load", "__version__"]
