"""The Batch every stage after collation reads: per-modality tensor fields, keys and presence masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch.

    fields: modality -> field name -> tensor with leading dim B (e.g. ``image.pixels`` uint8
    (B,3,H,W), ``text.ids`` / ``text.mask`` (B,L)). present: modality -> (B,) bool, True where the
    sample has that modality. keys: the ``__key__`` of each sample. meta: per-sample extras that are
    not tensors (raw captions, json), plus loader bookkeeping under ``meta['_loader']``.
    """

    fields: dict[str, dict[str, Tensor]]
    present: dict[str, Tensor]
    keys: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, modality: str) -> dict[str, Tensor]:
        return self.fields[modality]

    def __contains__(self, modality: str) -> bool:
        return modality in self.fields

    @property
    def modalities(self) -> list[str]:
        return list(self.fields)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move every tensor field to ``device`` (uint8 images stay uint8)."""
        return Batch(
            fields={m: {k: v.to(device, non_blocking=non_blocking) for k, v in f.items()} for m, f in self.fields.items()},
            present={m: v.to(device, non_blocking=non_blocking) for m, v in self.present.items()},
            keys=self.keys,
            meta=self.meta,
        )

    def pin_memory(self) -> Batch:
        """Used by DataLoader(pin_memory=True)."""
        return Batch(
            fields={m: {k: v.pin_memory() for k, v in f.items()} for m, f in self.fields.items()},
            present={m: v.pin_memory() for m, v in self.present.items()},
            keys=self.keys,
            meta=self.meta,
        )
