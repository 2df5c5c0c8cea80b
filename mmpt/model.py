"""MultimodalModel: encoders and projection heads keyed by modality (ImageBind's ModuleDicts)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Encoder, EncoderOutput, ModalityData
from mmpt.registry import ConfigError


def build_head(kind: str, width: int, embed_dim: int) -> nn.Module:
    """Projection from an encoder's width to the shared embedding size."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
    if kind == "none":
        if width != embed_dim:
            raise ConfigError(f"model.head: 'none' needs encoder width {width} == embed_dim {embed_dim}")
        return nn.Identity()
    raise ConfigError(f"model.head: unknown head {kind!r}: expected linear|mlp|none")


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

    def encode_fields(self, modality: str, fields: dict[str, Tensor], tokens: bool = False) -> EncoderOutput:
        """Run one tower and its head on collated fields; ``tokens`` also sets ``token_embedding``: every
        token through the same head, L2-normalised (B, T, embed_dim), for token-wise objectives (FILIP)."""
        out = self.encoders[modality](fields)
        out.embedding = F.normalize(self.heads[modality](out.pooled).float(), dim=-1)
        if tokens:
            out.token_embedding = F.normalize(self.heads[modality](out.tokens).float(), dim=-1)
        return out

    def forward(self, fields: dict[str, dict[str, Tensor]], modalities: list[str] | None = None,
                tokens: tuple[str, ...] = ()) -> dict[str, EncoderOutput]:
        """Encode every requested modality present in ``fields``; those in ``tokens`` also per token."""
        wanted = modalities if modalities is not None else list(fields)
        return {m: self.encode_fields(m, fields[m], m in tokens) for m in wanted if m in fields and m in self.encoders}

    @torch.no_grad()
    def encode(self, modality: str, inputs: dict[str, Tensor] | list[Any] | Tensor, normalize: bool = True) -> Tensor:
        """Embeddings (B, embed_dim) of collated fields, a batch tensor the modality accepts (e.g.
        uint8 images), or a list of raw inputs (PIL images, paths, strings)."""
        if modality not in self.encoders:
            raise ConfigError(f"encode: no encoder for modality {modality!r}; have {', '.join(self.encoders)}")
        fields = self._fields(modality, inputs)
        device = next(self.parameters()).device
        out = self.encode_fields(modality, {k: v.to(device) for k, v in fields.items()})
        if normalize:
            return out.embedding
        return self.heads[modality](out.pooled).float()

    def _fields(self, modality: str, inputs: Any) -> dict[str, Tensor]:
        # Raw-input handling belongs to the modality's data side: the core names no modality.
        if isinstance(inputs, dict):
            return inputs
        data = self.data.get(modality)
        if data is None:
            raise ConfigError(f"encode('{modality}', ...): no data transform for this modality; pass collated fields")
        if isinstance(inputs, Tensor):
            return data.fields_from_tensor(inputs)
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ConfigError(f"encode('{modality}', []): nothing to encode")
            return data.prepare(list(inputs), train=False)
        raise ConfigError(f"encode('{modality}', ...): pass a list of inputs (e.g. [x]), a batch tensor or a dict "
                          f"of fields, not one {type(inputs).__name__}")
