"""Padding work a sequence tower can skip: cut a batch after its longest row (training, every rank alike),
and run a tower's trunk on groups of rows of similar length (:func:`by_length`).

A tower whose outputs on real tokens do not depend on padding columns after the last real one (causal
attention, or attention that masks padded keys; pooling by the mask) declares ``trims_padding = True``.
Its modality's ``(B, L, ...)`` fields are then cut after the last column any row uses. Every rank cuts
at the same column (one all-reduce of a few integers per step) so that objectives gathering tokens across
ranks (FILIP, matching) still see one length. Towers without the flag (e.g. OpenCLIP's text tower, whose
causal mask is a buffer of the full context) get the batch unchanged.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmpt.contracts import Batch


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


def length_groups(lengths: list[int], max_groups: int = 4, overhead: int = 256) -> list[tuple[list[int], int]]:
    """Rows grouped by length, as ``[(rows, width), ...]`` with every row in exactly one group whose width
    covers it: the split of the length-sorted rows into at most ``max_groups`` runs that minimises the
    padded tokens computed (rows x width per group) plus ``overhead`` tokens per extra call."""
    import numpy as np

    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    per_length = Counter(lengths)
    values = np.array(sorted(per_length), dtype=np.float64)
    cum = np.concatenate([[0], np.cumsum([per_length[v] for v in values])])
    u = len(values)
    # cost[j, i]: one group holding the distinct lengths j..i-1 (rows cum[i] - cum[j] at width values[i-1]);
    # a dynamic programme over at most a context's worth of distinct lengths, vectorised over (j, i)
    j, i = np.meshgrid(np.arange(u + 1), np.arange(u + 1), indexing="ij")
    cost = np.where(j < i, (cum[i] - cum[j]) * np.concatenate([[0.0], values])[i] + overhead, np.inf)
    best, cuts = [np.where(np.arange(u + 1) == 0, 0.0, np.inf)], []
    for _ in range(max_groups):
        total = best[-1][:, None] + cost
        cuts.append(total.argmin(0))
        best.append(total.min(0))
    g = int(np.argmin([b[u] for b in best[1:]])) + 1
    bounds, end = [], u
    while end > 0:
        start = int(cuts[g - 1][end])
        bounds.append((start, end))
        end, g = start, g - 1
    groups = []
    for start, end in reversed(bounds):
        groups.append((order[int(cum[start]):int(cum[end])], int(values[end - 1])))
    return groups


def by_length(trunk: Callable[[Tensor, Tensor], Tensor], x: Tensor, mask: Tensor, max_groups: int = 4) -> Tensor:
    """``trunk(x, mask)`` on (B, T, D) for a trunk whose rows are independent and whose real tokens never
    see trailing padding (causal, or padded keys masked), run on groups of rows of similar length, each cut
    to its longest row: on web-length captions padded to 77 that is ~2.5x fewer tokens than one call.
    Real positions equal the single call's up to float rounding; positions past a row's group width keep
    their input (never read: consumers go through the mask). One call where grouping saves nothing, or
    under ZeRO-3 (each call would gather the weights)."""
    t = x.shape[1]
    lengths = (mask * torch.arange(1, t + 1, device=mask.device)).amax(1).tolist()
    partitioned = any(hasattr(p, "ds_id") for p in trunk.parameters()) if isinstance(trunk, nn.Module) else False
    groups = length_groups(lengths, 1 if partitioned else max_groups)
    if len(groups) == 1:
        width = max(groups[0][1], 1)
        return trunk(x, mask) if width == t else torch.cat([trunk(x[:, :width], mask[:, :width]), x[:, width:]], 1)
    parts, order = [], []
    for rows, width in groups:
        idx = torch.tensor(rows, device=x.device)
        parts.append(torch.cat([trunk(x[idx, :width], mask[idx, :width]), x[idx, width:]], 1))
        order += rows
    inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
    inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
    return torch.cat(parts)[inverse]
