"""Cut a training batch's trailing padding before the step (the text tower's main saving on short captions).

A tower whose outputs on real tokens do not depend on padding columns after the last real one (causal
attention, or attention that masks padded keys; pooling by the mask) declares ``trims_padding = True``.
Its modality's ``(B, L, ...)`` fields are then cut after the last column any row uses. Every rank cuts
at the same column (one all-reduce of a few integers per step) so that objectives gathering tokens across
ranks (FILIP, matching) still see one length. Towers without the flag (e.g. OpenCLIP's text tower, whose
causal mask is a buffer of the full context) get the batch unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from mmpt.data.batch import Batch


def trimmed_modalities(model: nn.Module) -> tuple[str, ...]:
    """Modalities whose tower declares ``trims_padding`` (same tuple on every rank: same model)."""
    return tuple(m for m, enc in model.encoders.items() if getattr(enc, "trims_padding", False))


def used_length(mask: torch.Tensor) -> int:
    """One past the last column that is real in any row (0 when no token is real)."""
    used = mask.reshape(mask.shape[0], mask.shape[1], -1).any(2).any(0)
    return int(used.nonzero().max()) + 1 if bool(used.any()) else 0


def trim_padding(batch: Batch, modalities: tuple[str, ...], world: int = 1,
                 device: torch.device | None = None) -> Batch:
    """``batch`` with each listed modality's fields cut to the longest real sequence over all ranks
    (at least one column); every rank must call it at the same steps when ``world > 1`` (``device``:
    where the process group's backend reduces, e.g. the GPU for NCCL)."""
    if not modalities:
        return batch
    full = [batch.fields[m]["mask"].shape[1] if "mask" in batch.fields.get(m, {}) else 0 for m in modalities]
    lengths = torch.tensor([used_length(batch.fields[m]["mask"]) if n else 0 for m, n in zip(modalities, full)])
    if world > 1:
        lengths = lengths.to(device or "cpu")
        dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
    fields = dict(batch.fields)
    for m, full_len, n in zip(modalities, full, lengths.tolist()):
        n = max(n, 1)
        if full_len and n < full_len:
            fields[m] = {k: v[:, :n] if v.dim() >= 2 and v.shape[1] == full_len else v for k, v in fields[m].items()}
    return dataclasses.replace(batch, fields=fields)
