"""SigLIP: pairwise sigmoid loss (Zhai et al. 2023) with a learnable temperature and bias per pair.

Distributed as in SigLIP and OpenCLIP's ``SigLipLoss``: each rank scores its rows of ``a`` against its
own ``b`` columns, then passes ``b`` blocks to its ring neighbours (both directions at once) and scores
each block it receives, so no rank ever holds more than a (B, B) block of logits. Gradients flow back
through the exchange to the rank that owns each block.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.objectives.contrastive import (
    bounded_log_scale,
    check_pairs,
    embedding_of,
    gather_mask,
    loss_world,
    present,
)
from mmpt.registry import ConfigError, closest, objectives

EXCHANGES = ("bidir", "ring", "local")


def _p2p(sends: list[tuple[Tensor, int]], recv_from: list[int], like: Tensor) -> list[Tensor]:
    """Send each (tensor, peer) and receive one ``like``-shaped tensor from each peer, in one batch."""
    received = [torch.empty_like(like) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, r, peer) for r, peer in zip(received, recv_from, strict=True)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _Exchange(torch.autograd.Function):
    """Send ``to_left`` left and ``to_right`` right; return (from_right, from_left). Backward sends each
    received block's gradient back to the rank it came from. ``to_left`` may be None (one direction)."""

    @staticmethod
    def forward(ctx, left: int, right: int, to_left: Tensor | None, to_right: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.left, ctx.right, ctx.one_way = left, right, to_left is None
        if to_left is None:
            return tuple(_p2p([(to_right, right)], [left], to_right))
        from_right, from_left = _p2p([(to_left, left), (to_right, right)], [right, left], to_right)
        return from_right, from_left

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:  # type: ignore[override]
        if ctx.one_way:
            (g_from_left,) = grads
            (g_to_right,) = _p2p([(g_from_left, ctx.left)], [ctx.right], g_from_left)
            return None, None, None, g_to_right
        g_from_right, g_from_left = grads
        g_to_left, g_to_right = _p2p([(g_from_right, ctx.right), (g_from_left, ctx.left)], [ctx.left, ctx.right],
                                     g_from_right)
        return None, None, g_to_left, g_to_right


def _blocks(b: Tensor, rank: int, world: int, exchange: str):
    """Yield (origin rank, block of ``b``) for every rank's block, this rank's first, passing blocks
    around the ring (``bidir``: both neighbours per round, as OpenCLIP's default)."""
    yield rank, b
    left, right = (rank - 1) % world, (rank + 1) % world
    hops = world - 1
    to_left = to_right = b
    if exchange == "bidir":
        rounds, hops = divmod(world - 1, 2)
        for k in range(1, rounds + 1):
            to_left, to_right = _Exchange.apply(left, right, to_left, to_right)
            yield (rank + k) % world, to_left
            yield (rank - k) % world, to_right
        done = rounds
    else:
        done = 0
    for k in range(done + 1, done + hops + 1):
        (to_right,) = _Exchange.apply(left, right, None, to_right)
        yield (rank - k) % world, to_right


def siglip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    exchange: str = "bidir",
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise sigmoid loss of paired rows of ``a`` and ``b`` (B, E); returns (loss, detached metrics).

    logit_scale and logit_bias: the scale (not its log) and bias, scalars or (1,). Each rank's loss is
    -sum(log sigmoid(z_ij * (scale a_i.b_j + bias))) over its rows and every column, z = 1 on matching
    pairs and -1 elsewhere, divided by B (OpenCLIP's SigLipLoss), so the mean of rank losses is the
    single-process loss of the concatenated batch. valid: optional (B,) bool, False where a sample
    lacks one of the two modalities: its row and column leave the loss, which is then divided by the
    global count of valid rows / world. Metrics: ``acc`` (a->b top-1 over this rank's valid rows) and
    ``acc_ba`` (b->a), computed from per-row and per-column maxima, never the full matrix.
    exchange: 'bidir', 'ring' (one direction) or 'local' (no exchange). Every rank must pass the same B.
    """
    rank, world = loss_world(exchange == "local")
    n = a.shape[0]
    valid_all = None
    if valid is not None:
        valid_all = (gather_mask(valid, world) if world > 1 else valid).to(a.device, torch.bool)
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    a = a.float()
    loss = a.new_zeros(())
    row_best = torch.full((n,), -math.inf, device=a.device)  # best non-matching logit of each row
    col_best = torch.full((world * n,), -math.inf, device=a.device)  # ... of each global column
    pos = torch.empty(n, device=a.device)
    for origin, block in _blocks(b, rank, world, exchange):
        logits = scale * a @ block.float().T + bias
        own = origin == rank
        sign = 2 * torch.eye(n, device=a.device) - 1 if own else -torch.ones(n, n, device=a.device)
        terms = F.logsigmoid(sign * logits)
        if valid_all is not None:
            pair = valid_all[rank * n:(rank + 1) * n, None] & valid_all[None, origin * n:(origin + 1) * n]
            terms = terms * pair
        loss = loss - terms.sum()
        with torch.no_grad():
            others = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), -math.inf) if own else logits
            if valid_all is not None:
                others = others.masked_fill(~valid_all[None, origin * n:(origin + 1) * n], -math.inf)
            row_best = torch.maximum(row_best, others.max(dim=1).values)
            if valid_all is not None:
                others = others.masked_fill(~valid_all[rank * n:(rank + 1) * n, None], -math.inf)
            col_best[origin * n:(origin + 1) * n] = others.max(dim=0).values
            if own:
                pos = logits.diagonal().clone()
    count = torch.tensor(float(world * n), device=a.device) if valid_all is None else valid_all.sum().float()
    loss = loss / (count.clamp(min=1) / world)
    return loss, _accuracy(pos, row_best, col_best, valid_all, rank, world)


def _accuracy(pos: Tensor, row_best: Tensor, col_best: Tensor, valid_all: Tensor | None, rank: int,
              world: int) -> dict[str, Tensor]:
    """Top-1 a->b / b->a accuracy of this rank's valid rows: the matching logit beats every other one.
    Column maxima live on the ranks that scored them; one (N,) max-reduce brings them home."""
    n = pos.shape[0]
    with torch.no_grad():
        if world > 1:
            dist.all_reduce(col_best, op=dist.ReduceOp.MAX)
        own = slice(rank * n, (rank + 1) * n)
        hits = {"acc": (pos > row_best).float(), "acc_ba": (pos > col_best[own]).float()}
        w = torch.ones(n, device=pos.device) if valid_all is None else valid_all[own].float()
        return {k: (h * w).sum() / w.sum().clamp(min=1) for k, h in hits.items()}


@objectives.register("siglip")
class SigLIP(Objective):
    """SigLIP sigmoid loss over modality pairs, with a learnable logit scale and bias per pair.

    ``logit_scale`` holds the log of the scale and ``logit_bias`` the bias, one entry per pair (P,);
    SigLIP starts them at log 10 and -10 so the many negatives do not swamp the first steps. Samples
    lacking a modality (``batch.present``) are masked out of the pairs they cannot join.

    pairs: modality pairs to contrast, e.g. [[image, text]]. exchange: how ``b`` blocks cross ranks:
    'bidir' (both ring neighbours per round), 'ring' (one direction) or 'local' (no exchange).
    init_logit_scale: starting scale (1/temperature; SigLIP: 10). init_logit_bias: starting bias
    (SigLIP: -10). max_logit_scale: upper bound of the scale. learn_logit_scale: train scale and bias.
    """

    tiny_configs = ({"pairs": [["image", "text"]]},)

    def __init__(
        self,
        *,
        pairs: list[list[str]],
        exchange: str = "bidir",
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
    ):
        super().__init__()
        if exchange not in EXCHANGES:
            raise ConfigError(f"siglip.exchange: unknown {exchange!r}{closest(str(exchange), EXCHANGES)}; "
                              f"valid: {', '.join(EXCHANGES)}")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"siglip.init_logit_scale: expected 0 < init_logit_scale <= max_logit_scale "
                              f"({max_logit_scale}), got {init_logit_scale}")
        self.exchange = exchange
        self.pairs = check_pairs(pairs, "siglip")
        self.max_logit_scale = float(max_logit_scale)
        p = len(self.pairs)
        self.logit_scale = nn.Parameter(torch.full((p,), math.log(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.full((p,), float(init_logit_bias)), requires_grad=learn_logit_scale)
        self.modalities = tuple(dict.fromkeys(m for pair in self.pairs for m in pair))

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """Mean over pairs of the masked sigmoid loss, plus per-pair accuracy, scale and bias."""
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        losses, metrics = [], {}
        for i, (a, b) in enumerate(self.pairs):
            ea, eb = embedding_of(outputs, a, "siglip"), embedding_of(outputs, b, "siglip")
            valid = present(batch, a, ea) & present(batch, b, eb)
            loss, m = siglip_loss(ea, eb, scales[i], self.logit_bias[i], exchange=self.exchange, valid=valid)
            losses.append(loss)
            metrics[f"{a}_{b}/acc"] = m["acc"]
            metrics[f"{b}_{a}/acc"] = m["acc_ba"]
            metrics[f"{a}_{b}/logit_scale"] = scales[i].detach()
            metrics[f"{a}_{b}/logit_bias"] = self.logit_bias[i].detach().float()
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the logit scales and biases."""
        return {"logit_scale", "logit_bias"}
