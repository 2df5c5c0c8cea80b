"""mmpt: multimodal pretraining — pluggable modality encoders, shared objectives, DeepSpeed ZeRO,
WebDataset shards."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, device: str = "cpu", *, allow_nonfinite: bool = False) -> tuple[Any, dict[str, Any], Any]:
    """``model, transforms, tokenizer = mmpt.load(path)`` from an export or a run directory.

    An export is untrusted data: its config is checked against its tensors before anything is
    allocated, and weights holding NaN/inf are refused unless ``allow_nonfinite``.
    """
    from mmpt.export import load as _load

    return _load(path, device, allow_nonfinite=allow_nonfinite)


__all__ = ["load", "__version__"]
