"""Rank worker for test_contrastive: every 2-rank clip_loss scenario in one torchrun launch.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/objectives/_clip_ranks.py OUTDIR
Writes OUTDIR/{clip,siglip,filip,itm}_rank{r}.pt: {scenario: {name: tensor}}, one file per objective. Inputs are seeded identically on every rank;
each rank takes its slice of the global batch, so the test can rebuild the global batch itself.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD, LOCAL_BATCH, DIM, SCALE = 2, 4, 8, 10.0
MODES = [("local", False), ("no_grad", False), ("no_grad", True), ("with_grad", False), ("with_grad", True)]
# siglip exchange -> OpenCLIP SigLipLoss dist_impl
SIGLIP_EXCHANGES = {"bidir": "bidir", "ring": "shift"}
SIGLIP_BIAS = -4.0


def global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of all ranks, (WORLD * LOCAL_BATCH, DIM) each, unit rows."""
    g = torch.Generator().manual_seed(1234)
    n = WORLD * LOCAL_BATCH
    a = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    # Correlate b with a so accuracies are neither 0 nor 1 everywhere.
    b = F.normalize(a + 0.8 * torch.randn(n, DIM, generator=g), dim=-1)
    return a, b


def global_masks() -> dict[str, torch.Tensor | None]:
    """Validity masks of the global batch: None (unmasked path) and several absent patterns."""
    n = WORLD * LOCAL_BATCH
    some = torch.ones(n, dtype=torch.bool)
    some[[1, 4, 7]] = False
    rank1_absent = torch.ones(n, dtype=torch.bool)
    rank1_absent[LOCAL_BATCH:] = False
    return {
        "unmasked": None,
        "all": torch.ones(n, dtype=torch.bool),
        "some": some,
        "rank1_absent": rank1_absent,
        "none": torch.zeros(n, dtype=torch.bool),
    }


def _leaves(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.tensor([SCALE], requires_grad=True)
    return a.clone().requires_grad_(True), b.clone().requires_grad_(True), scale


def siglip_scenarios(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """siglip_loss per exchange and mask, OpenCLIP's SigLipLoss where unmasked, and the SigLIP module."""
    from open_clip.loss import SigLipLoss

    from mmpt.contracts import Batch, EncoderOutput
    from mmpt.objectives.siglip import SigLIP, siglip_loss

    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    a_glob, b_glob = global_inputs()
    results: dict[str, dict[str, torch.Tensor]] = {}
    for exchange, impl in SIGLIP_EXCHANGES.items():
        for mask_name, mask in global_masks().items():
            a, b, s = _leaves(a_glob[rows], b_glob[rows])
            bias = torch.tensor([SIGLIP_BIAS], requires_grad=True)
            loss, metrics = siglip_loss(a, b, s, bias, exchange=exchange, valid=None if mask is None else mask[rows])
            loss.backward()
            res = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": s.grad,
                   "grad_bias": bias.grad, **metrics}
            if mask is None:
                ra, rb, rs = _leaves(a_glob[rows], b_glob[rows])
                rbias = torch.tensor([SIGLIP_BIAS], requires_grad=True)
                ref = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(ra, rb, rs, rbias)
                ref.backward()
                res.update(ref_loss=ref.detach(), ref_grad_a=ra.grad, ref_grad_b=rb.grad, ref_grad_scale=rs.grad,
                           ref_grad_bias=rbias.grad)
            results[f"siglip/{exchange}/{mask_name}"] = res
            # The unchunked path (every block's logits kept for autograd), for chunked == unchunked.
            a, b, s = _leaves(a_glob[rows], b_glob[rows])
            bias = torch.tensor([SIGLIP_BIAS], requires_grad=True)
            loss, metrics = siglip_loss(a, b, s, bias, exchange=exchange, valid=None if mask is None else mask[rows],
                                        chunked=False)
            loss.backward()
            results[f"siglip/{exchange}/{mask_name}/unchunked"] = {
                "loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": s.grad,
                "grad_bias": bias.grad, **metrics}

    some = global_masks()["some"]
    assert some is not None
    def module_run(objective: SigLIP) -> dict[str, torch.Tensor]:
        a, b, _ = _leaves(a_glob[rows], b_glob[rows])
        out = objective(
            {"image": EncoderOutput(tokens=a[:, None], mask=None, pooled=a, embedding=a),
             "text": EncoderOutput(tokens=b[:, None], mask=None, pooled=b, embedding=b)},
            Batch(fields={}, present={"image": some[rows]}, keys=[str(i) for i in range(LOCAL_BATCH)]),
        )
        out.loss.backward()
        return {"loss": out.loss.detach(), "grad_a": a.grad, "grad_b": b.grad,
                "grad_scale": objective.logit_scale.grad, "grad_bias": objective.logit_bias.grad}

    results["siglip/module"] = module_run(SigLIP(pairs=[["image", "text"]]))
    # Matryoshka sizes: each size's loss through the same chunked ring (tests/objectives/test_matryoshka.py)
    results["siglip/module_nested"] = module_run(
        SigLIP(pairs=[["image", "text"]], matryoshka_dims=[4, DIM], matryoshka_weights=[1.0, 0.5]))
    return results


FILIP_MODES = [("no_grad", False), ("with_grad", False), ("with_grad", True)]


def filip_global_tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings of the global batch: a (N, 3, DIM), b (N, 5, DIM) and their masks (1..T real tokens)."""
    g = torch.Generator().manual_seed(4321)
    n = WORLD * LOCAL_BATCH
    a = F.normalize(torch.randn(n, 3, DIM, generator=g), dim=-1)
    b = F.normalize(a.mean(1, keepdim=True) + 0.8 * torch.randn(n, 5, DIM, generator=g), dim=-1)
    a_mask = torch.arange(3)[None] < torch.randint(1, 4, (n, 1), generator=g)
    b_mask = torch.arange(5)[None] < torch.randint(1, 6, (n, 1), generator=g)
    return a, a_mask, b, b_mask


def filip_scenarios(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """filip_loss per gather mode, unmasked and with absent samples."""
    from mmpt.objectives.contrastive import GatherMode
    from mmpt.objectives.filip import filip_loss

    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    a_glob, a_mask, b_glob, b_mask = filip_global_tokens()
    results: dict[str, dict[str, torch.Tensor]] = {}
    for gather, local_loss in FILIP_MODES:
        for mask_name in ("unmasked", "some"):
            mask = global_masks()[mask_name]
            a, b, s = _leaves(a_glob[rows], b_glob[rows])
            loss, metrics = filip_loss(a, a_mask[rows], b, b_mask[rows], s, gather=GatherMode(gather, local_loss),
                                       valid=None if mask is None else mask[rows])
            loss.backward()
            results[f"filip/{gather}/{int(local_loss)}/{mask_name}"] = {
                "loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": s.grad, **metrics}
    return results


def itm_scenarios(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """ITM with global (with_grad) and local negatives. Each rank's texts sit next to the *other* rank's
    images in embedding space, so hard negatives come from the other rank; row 0 has the same caption on
    both ranks. Rank 0's loss is multiplied by 0: any gradient on its tokens came from rank 1's loss."""
    import mmpt.objectives.matching as matching
    from mmpt.contracts import Batch, EncoderOutput

    g = torch.Generator().manual_seed(99)
    n = WORLD * LOCAL_BATCH
    text_tok, image_tok = torch.randn(n, 5, 6, generator=g), torch.randn(n, 3, 4, generator=g)
    ids = torch.arange(1, n + 1)[:, None].repeat(1, 5)
    ids[LOCAL_BATCH] = ids[0]  # the same caption on both ranks
    u, v = torch.zeros(n, DIM), torch.zeros(n, DIM)
    u[:, 0], v[:, 1] = 1.0, 1.0
    noise = 0.05 * torch.randn(n, DIM, generator=g)
    text_emb = F.normalize(torch.where(torch.arange(n)[:, None] < LOCAL_BATCH, u, v) + noise, dim=-1)
    image_emb = F.normalize(torch.where(torch.arange(n)[:, None] < LOCAL_BATCH, v, u) + noise, dim=-1)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    drawn: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sample = matching.sample_negatives

    def recording(scores: torch.Tensor, forbidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, ok = sample(scores, forbidden)
        drawn.append((idx, ok, forbidden))
        return idx, ok

    matching.sample_negatives = recording
    results: dict[str, dict[str, torch.Tensor]] = {}
    for gather in ("with_grad", "local"):
        torch.manual_seed(7 + rank)
        itm = matching.ITM(pairs=[["text", "image"]], widths={"text": 6, "image": 4}, width=8, depth=1, heads=2,
                           gather=gather, features="tokens")
        t, i = text_tok[rows].clone().requires_grad_(True), image_tok[rows].clone().requires_grad_(True)
        outs = {"text": EncoderOutput(tokens=t, mask=None, pooled=t.mean(1), embedding=text_emb[rows]),
                "image": EncoderOutput(tokens=i, mask=None, pooled=i.mean(1), embedding=image_emb[rows])}
        fields = {"text": {"ids": ids[rows], "mask": ids[rows] > 0}}
        drawn.clear()
        out = itm(outs, Batch(fields=fields, present={}, keys=[str(k) for k in range(LOCAL_BATCH)]))
        (out.loss * float(rank)).backward()
        idx = torch.cat([d[0] for d in drawn])
        other = (idx >= LOCAL_BATCH) if rank == 0 else (idx < LOCAL_BATCH)
        hit = torch.cat([f[torch.arange(len(x)), x] & ok for x, ok, f in drawn])
        results[f"itm/{'global' if gather == 'with_grad' else 'local'}"] = {
            "loss": out.loss.detach(), "grad_text": t.grad if t.grad is not None else torch.zeros_like(t),
            "grad_image": i.grad if i.grad is not None else torch.zeros_like(i),
            "drawn_other_rank": other.sum(), "drawn_same_caption": hit.sum(),
            "forbids_duplicate": drawn[0][2][0, LOCAL_BATCH if rank == 0 else 0] if gather == "with_grad"
            else torch.tensor(True)}
    matching.sample_negatives = sample
    return results


def main(outdir: Path) -> None:
    from open_clip.loss import ClipLoss

    from mmpt.contracts import Batch, EncoderOutput
    from mmpt.objectives.contrastive import CLIP, GatherMode, clip_loss

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, world
    for name, scenarios in (("siglip", siglip_scenarios), ("filip", filip_scenarios), ("itm", itm_scenarios)):
        torch.save(scenarios(rank, world), outdir / f"{name}_rank{rank}.pt")
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    a_glob, b_glob = global_inputs()
    a_loc, b_loc = a_glob[rows], b_glob[rows]

    results: dict[str, dict[str, torch.Tensor]] = {}
    for gather, local_loss in MODES:
        mode = GatherMode(gather, local_loss)
        for mask_name, mask in global_masks().items():
            a, b, s = _leaves(a_loc, b_loc)
            valid = None if mask is None else mask[rows]
            loss, metrics = clip_loss(a, b, s, gather=mode, valid=valid)
            loss.backward()
            res = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": s.grad,
                   "acc": metrics["acc"], "acc_ba": metrics["acc_ba"]}
            if mask is None:
                ref = ClipLoss(local_loss=local_loss, gather_with_grad=gather == "with_grad", rank=rank,
                               world_size=1 if gather == "local" else world)
                ra, rb, rs = _leaves(a_loc, b_loc)
                ref_loss = ref(ra, rb, rs)
                ref_loss.backward()
                res.update(ref_loss=ref_loss.detach(), ref_grad_a=ra.grad, ref_grad_b=rb.grad,
                           ref_grad_scale=rs.grad)
            results[f"{gather}/{int(local_loss)}/{mask_name}"] = res

    # The module end to end: presence masks from a Batch, scale from its parameter.
    some = global_masks()["some"]
    assert some is not None
    objective = CLIP(pairs=[["image", "text"]], gather="with_grad", local_loss=True)
    a, b, _ = _leaves(a_loc, b_loc)
    out = objective(
        {"image": EncoderOutput(tokens=a[:, None], mask=None, pooled=a, embedding=a),
         "text": EncoderOutput(tokens=b[:, None], mask=None, pooled=b, embedding=b)},
        Batch(fields={}, present={"image": some[rows], "text": torch.ones(LOCAL_BATCH, dtype=torch.bool)},
              keys=[str(i) for i in range(LOCAL_BATCH)]),
    )
    out.loss.backward()
    results["module"] = {"loss": out.loss.detach(), "grad_a": a.grad, "grad_scale": objective.logit_scale.grad}

    torch.save(results, outdir / f"clip_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
