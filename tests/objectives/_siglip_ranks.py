"""Rank worker for test_siglip at any world size: chunked and unchunked siglip_loss per exchange and mask.

Usage: python -m torch.distributed.run --nproc_per_node W tests/objectives/_siglip_ranks.py OUTDIR
Writes OUTDIR/siglip_rank{r}.pt: {scenario: {name: tensor}}. Inputs come from ``global_inputs(W)``, seeded
identically on every rank; each rank takes its LOCAL_BATCH rows.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _clip_ranks import LOCAL_BATCH, SIGLIP_BIAS, _leaves  # the 2-rank harness's sizes and leaves

EXCHANGES = ("bidir", "ring")


def global_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of ``world`` ranks, (world * LOCAL_BATCH, 8) each, unit rows, b near a."""
    g = torch.Generator().manual_seed(77 + world)
    a = F.normalize(torch.randn(world * LOCAL_BATCH, 8, generator=g), dim=-1)
    return a, F.normalize(a + 0.8 * torch.randn(a.shape, generator=g), dim=-1)


def global_masks(world: int) -> dict[str, torch.Tensor | None]:
    """None (the unmasked path) and a mask with absent samples on several ranks."""
    some = torch.ones(world * LOCAL_BATCH, dtype=torch.bool)
    some[[1, 4, 7, world * LOCAL_BATCH - 1]] = False
    return {"unmasked": None, "some": some}


def main(outdir: Path) -> None:
    from mmpt.objectives.siglip import siglip_loss

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    a_glob, b_glob = global_inputs(world)
    results: dict[str, dict[str, torch.Tensor]] = {}
    for exchange in EXCHANGES:
        for mask_name, mask in global_masks(world).items():
            for chunked in (True, False):
                a, b, s = _leaves(a_glob[rows], b_glob[rows])
                bias = torch.tensor([SIGLIP_BIAS], requires_grad=True)
                loss, metrics = siglip_loss(a, b, s, bias, exchange=exchange, chunked=chunked,
                                            valid=None if mask is None else mask[rows])
                loss.backward()
                results[f"{exchange}/{mask_name}/{'chunked' if chunked else 'unchunked'}"] = {
                    "loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": s.grad,
                    "grad_bias": bias.grad, **metrics}
    torch.save(results, outdir / f"siglip_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
