"""MultimodalModel: encoders and projection heads keyed by modality (ImageBind's ModuleDicts)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.encoders.base import Encoder, EncoderOutput, ModalityData


def build_head(kind: str, width: int, embed_dim: int) -> nn.Module:
    """Projection from an encoder's width to the shared embedding size."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"head 'none' needs encoder width {width} == embed_dim {embed_dim}")
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}: expected linear|mlp|none")


class MultimodalModel(nn.Module):
    """Encoders + heads keyed by modality. ``forward(fields)`` returns an EncoderOutput per modality
    with ``embedding`` = L2-normalised projection of ``pooled``."""

    def __init__(self, encoders: dict[str, Encoder], embed_dim: int, head: str = "linear",
                 data: dict[str, ModalityData] | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict({m: build_head(head, e.width, embed_dim) for m, e in encoders.items()})
        # Data sides are plain objects (not modules): raw inputs -> fields for encode().
        self.data = dict(data or {})

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode_fields(self, modality: str, fields: dict[str, Tensor]) -> EncoderOutput:
        """Run one tower and its head on collated fields."""
        out = self.encoders[modality](fields)
        out.embedding = F.normalize(self.heads[modality](out.pooled).float(), dim=-1)
        return out

    def forward(self, fields: dict[str, dict[str, Tensor]], modalities: list[str] | None = None) -> dict[str, EncoderOutput]:
        """Encode every requested modality present in ``fields``."""
        wanted = modalities if modalities is not None else list(fields)
        return {m: self.encode_fields(m, fields[m]) for m in wanted if m in fields and m in self.encoders}

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, Tensor] | list[Any] | Tensor, normalize: bool = True) -> Tensor:
        """Embeddings (B, embed_dim) of tensors (collated fields, or a uint8/float image batch) or raw
        inputs (PIL images, paths, strings)."""
        if modality not in self.encoders:
            raise KeyError(f"no encoder for modality {modality!r}; have {', '.join(self.encoders)}")
        if isinstance(inputs, Tensor):
            inputs = {"pixels": inputs} if modality == "image" else {"ids": inputs, "mask": torch.ones_like(inputs, dtype=torch.bool)}
        elif isinstance(inputs, (list, tuple)):
            if modality not in self.data:
                raise ValueError(f"no data transform for modality {modality!r}: pass collated tensors")
            inputs = self.data[modality].prepare(list(inputs), train=False)
        device = next(self.parameters()).device
        out = self.encode_fields(modality, {k: v.to(device) for k, v in inputs.items()})
        if normalize:
            return out.embedding
        return self.heads[modality](out.pooled).float()
