"""SigLIP: pairwise sigmoid loss (Zhai et al. 2023) with a learnable temperature and bias per pair.

Distributed as in SigLIP and OpenCLIP's ``SigLipLoss``: each rank scores its rows of ``a`` against its
own ``b`` columns, then passes ``b`` blocks to its ring neighbours (both directions at once) and scores
each block it receives, so no rank ever holds more than a (B, B) block of logits. Gradients flow back
through the exchange to the rank that owns each block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.matryoshka import NESTING_KEYS_DOC, LayerViews, Nesting, nested_pair_losses
from mmpt.nn.precision import full_precision
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
    return _p2p_into(sends, [(torch.empty_like(like), peer) for peer in recv_from])


def _p2p_into(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]]) -> list[Tensor]:
    """Send each (tensor, peer) and receive into each (buffer, peer), in one batch; return the buffers."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, r, peer) for r, peer in recvs]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return [r for r, _ in recvs]


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


# A block feed: ``feed(b, grads)`` yields (origin rank, block of b, gradient accumulator or None) for every
# rank's block, this rank's first. With ``grads`` each accumulator is a float32 zeros_like(block) the
# caller adds that block's gradient into, in place, before asking for the next block; after the last
# block the feed brings each accumulator home to the block's owner, into the first (own) one.
BlockFeed = Callable[[Tensor, bool], Iterator[tuple[int, Tensor, Tensor | None]]]


def _schedule(world: int, exchange: str) -> list[tuple[int, ...]]:
    """The directions blocks move in each round (-1: to the left neighbour, +1: to the right)."""
    if exchange == "bidir":
        rounds, extra = divmod(world - 1, 2)
        return [(-1, 1)] * rounds + [(1,)] * extra
    return [(1,)] * (world - 1)


def exchange_order(rank: int, world: int, exchange: str) -> list[int]:
    """The origin ranks of the blocks ``rank`` scores, in the order the exchange delivers them."""
    order, hops = [rank], {-1: 0, 1: 0}
    for dirs in _schedule(world, exchange):
        for d in dirs:
            hops[d] += 1
            order.append((rank - d * hops[d]) % world)
    return order


def ring_feed(rank: int, world: int, exchange: str) -> BlockFeed:
    """The process group's block feed: ``b`` blocks travel the ring as ``exchange`` says. With grads, each
    block's accumulator travels with it (from its second hop on) and goes straight home after the last."""

    def feed(b: Tensor, grads: bool) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        own = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if grads else None
        yield rank, b, own
        moving: dict[int, tuple[Tensor, Tensor | None]] = {-1: (b, None), 1: (b, None)}
        hops = {-1: 0, 1: 0}
        for dirs in _schedule(world, exchange):
            sends, recvs = [], []
            for d in dirs:
                block, acc = moving[d]
                to, frm = (rank + d) % world, (rank - d) % world
                sends.append((block, to))
                recvs.append((torch.empty_like(block), frm))
                if acc is not None:  # a first hop leaves the owner's share at home: nothing to carry yet
                    sends.append((acc, to))
                    recvs.append((torch.empty_like(acc), frm))
            got = iter(_p2p_into(sends, recvs))
            for d in dirs:
                block = next(got)
                acc = (next(got) if hops[d] else torch.zeros_like(own)) if own is not None else None
                hops[d] += 1
                moving[d] = (block, acc)
                yield (rank - d * hops[d]) % world, block, acc
        if own is not None and world > 1:
            homeward = [d for d in (-1, 1) if hops[d]]
            back = _p2p_into([(moving[d][1], (rank - d * hops[d]) % world) for d in homeward],
                             [(torch.empty_like(own), (rank + d * hops[d]) % world) for d in homeward])
            for g in back:
                own += g

    return feed


class SimulatedRing:
    """A block feed for one rank of a simulated world, no process group: yields the blocks of the global
    ``b_all`` (world * B, E) in the exchange's order, and keeps every accumulator in ``grads[origin]``
    (the owner's share of the other ranks' gradients is theirs to add: sum ``grads`` over all ranks)."""

    def __init__(self, b_all: Tensor, rank: int, world: int, exchange: str = "bidir"):
        self.blocks, self.rank, self.world, self.exchange = b_all.chunk(world), rank, world, exchange
        self.grads: dict[int, Tensor] = {}

    def __call__(self, b: Tensor, grads: bool) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        for origin in exchange_order(self.rank, self.world, self.exchange):
            block = b if origin == self.rank else self.blocks[origin]
            acc = torch.zeros(block.shape, dtype=torch.float32, device=block.device) if grads else None
            if acc is not None:
                self.grads[origin] = acc
            yield origin, block, acc


def _signs(n: int, own: bool, device: torch.device) -> Tensor:
    """z of the sigmoid loss: +1 on matching pairs (the diagonal of the own block), -1 elsewhere."""
    return 2 * torch.eye(n, device=device) - 1 if own else -torch.ones(n, n, device=device)


def _pairs(valid_all: Tensor | None, rank: int, origin: int, n: int) -> Tensor | None:
    """(n, n) bool: both samples of the pair are present; None when every sample is."""
    if valid_all is None:
        return None
    return valid_all[rank * n:(rank + 1) * n, None] & valid_all[None, origin * n:(origin + 1) * n]


class _Best:
    """Per-row and per-global-column best non-matching logits and the matching ones, for the accuracy."""

    def __init__(self, n: int, world: int, device: torch.device):
        self.row = torch.full((n,), -math.inf, device=device)
        self.col = torch.full((world * n,), -math.inf, device=device)
        self.pos = torch.empty(n, device=device)

    @classmethod
    def of(cls, pos: Tensor, row: Tensor, col: Tensor) -> _Best:
        """The maxima already computed (by ``_Blockwise``)."""
        best = cls.__new__(cls)
        best.pos, best.row, best.col = pos, row, col
        return best

    @torch.no_grad()
    def update(self, logits: Tensor, own: bool, origin: int, rank: int, valid_all: Tensor | None) -> None:
        """Fold one (n, n) block of logits (this rank's rows, ``origin``'s columns) in."""
        n = logits.shape[0]
        others = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=logits.device), -math.inf) if own else logits
        if valid_all is not None:
            others = others.masked_fill(~valid_all[None, origin * n:(origin + 1) * n], -math.inf)
        self.row = torch.maximum(self.row, others.max(dim=1).values)
        if valid_all is not None:
            others = others.masked_fill(~valid_all[rank * n:(rank + 1) * n, None], -math.inf)
        self.col[origin * n:(origin + 1) * n] = others.max(dim=0).values
        if own:
            self.pos = logits.diagonal().clone()


def _block_loss(a: Tensor, block: Tensor, scale: Tensor, bias: Tensor, own: bool, pair: Tensor | None) -> tuple[Tensor, Tensor]:
    """(-sum of the block's log-sigmoid terms, its logits)."""
    logits = scale * a @ block.float().T + bias
    terms = F.logsigmoid(_signs(a.shape[0], own, a.device) * logits)
    if pair is not None:
        terms = terms * pair
    return -terms.sum(), logits


def _score_all(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, valid_all: Tensor | None, feed: BlockFeed,
               rank: int, world: int) -> tuple[Tensor, _Best]:
    """The loss sum over every block ``feed`` delivers (without grads), and the accuracy's maxima."""
    best, loss = _Best(a.shape[0], world, a.device), a.new_zeros(())
    for origin, block, _ in feed(b, False):
        term, logits = _block_loss(a, block, scale, bias, origin == rank, _pairs(valid_all, rank, origin, a.shape[0]))
        loss = loss + term
        best.update(logits, origin == rank, origin, rank, valid_all)
        del logits  # before the next block arrives (chunked: no block's logits outlive it)
    return loss, best


class _Blockwise(torch.autograd.Function):
    """The sigmoid loss sum over every block the feed delivers, one block's logits alive at a time:
    forward keeps none of them; backward asks the feed for the same blocks again, recomputes each
    block's logits and sends each block's gradient home through the feed."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, valid_all: Tensor | None,  # type: ignore[override]
                feed: BlockFeed, rank: int, world: int) -> tuple[Tensor, ...]:
        loss, best = _score_all(a, b, scale, bias, valid_all, feed, rank, world)
        ctx.save_for_backward(a, b, scale, bias, valid_all)
        ctx.feed, ctx.rank = feed, rank
        ctx.mark_non_differentiable(best.pos, best.row, best.col)
        ctx.set_materialize_grads(False)  # no (world * B,) zeros for the maxima's non-gradients in backward
        return loss, best.pos, best.row, best.col

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        a, b, scale, bias, valid_all = ctx.saved_tensors
        if g is None:
            return None, None, None, None, None, None, None, None
        n = a.shape[0]
        grad_a, grad_scale, grad_bias, own_grad = torch.zeros_like(a), a.new_zeros(()), a.new_zeros(()), None
        for origin, block, acc in ctx.feed(b, True):
            own = origin == ctx.rank
            block = block.float()
            dots = a @ block.T
            sign = _signs(n, own, a.device)
            # d(-logsigmoid(z x))/dx = -z sigmoid(-z x)
            dlogits = torch.sigmoid(-sign * (scale * dots + bias)).mul_(-sign).mul_(g)
            pair = _pairs(valid_all, ctx.rank, origin, n)
            if pair is not None:
                dlogits = dlogits * pair
            grad_scale += (dlogits * dots).sum()
            grad_bias += dlogits.sum()
            dlogits *= scale  # now d/d(dots)
            grad_a.addmm_(dlogits, block)
            acc.addmm_(dlogits.T, a)
            if own:
                own_grad = acc
            del dots, sign, dlogits
        return grad_a, own_grad.to(b.dtype), grad_scale, grad_bias, None, None, None, None


def blockwise_sigmoid_loss(
    a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, *, rank: int, world: int, feed: BlockFeed,
    valid_all: Tensor | None = None, chunked: bool = True,
) -> tuple[Tensor, _Best]:
    """This rank's sigmoid loss sum over the blocks ``feed`` delivers, and the accuracy's maxima.

    a: this rank's (B, E) float32 rows; scale and bias: float32 scalars. chunked: forward and backward
    block by block (flat memory); otherwise autograd keeps every block's logits (the feed must then
    carry gradients itself, as ``_blocks`` does: it yields no accumulators)."""
    if chunked:
        loss, pos, row, col = _Blockwise.apply(a, b, scale, bias, valid_all, feed, rank, world)
        return loss, _Best.of(pos, row, col)
    return _score_all(a, b, scale, bias, valid_all, feed, rank, world)


@full_precision
def siglip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    exchange: str = "bidir",
    valid: Tensor | None = None,
    chunked: bool = True,
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
    chunked: compute forward and backward one (B, B) block at a time, recomputing each block's logits in
    backward (the blocks travel the ring again, their gradients with them), so loss memory does not grow
    with the world size; False keeps every block's logits for autograd (memory grows with the world).
    Same loss bit for bit, gradients equal to fp32 rounding.
    """
    rank, world = loss_world(exchange == "local")
    valid_all = None
    if valid is not None:
        valid_all = (gather_mask(valid, world) if world > 1 else valid).to(a.device, torch.bool)
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    if chunked:
        feed = ring_feed(rank, world, exchange)
    else:
        def feed(b: Tensor, grads: bool) -> Iterator[tuple[int, Tensor, Tensor | None]]:
            return ((origin, block, None) for origin, block in _blocks(b, rank, world, exchange))
    loss, best = blockwise_sigmoid_loss(a.float(), b, scale, bias, rank=rank, world=world, feed=feed,
                                        valid_all=valid_all, chunked=chunked)
    n = a.shape[0]
    count = torch.tensor(float(world * n), device=a.device) if valid_all is None else valid_all.sum().float()
    loss = loss / (count.clamp(min=1) / world)
    return loss, _accuracy(best.pos, best.row, best.col, valid_all, rank, world)


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
    chunked: forward and backward one (B, B) block of logits at a time, backward recomputing each block as
    the blocks travel the ring again, so loss memory is O(B^2) at any world size (default); false keeps
    every block's logits for autograd, O(B^2 x world). Same loss bit for bit, gradients to fp32 rounding.
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
        chunked: bool = True,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        starbucks: list[list[int]] | None = None,
        starbucks_sample: bool = False,
    ):
        super().__init__()
        self.nesting = Nesting("siglip", matryoshka_dims, matryoshka_weights, starbucks, starbucks_sample)
        self.uses_model = self.nesting.uses_layers  # layer exits run the towers again
        if exchange not in EXCHANGES:
            raise ConfigError(f"siglip.exchange: unknown {exchange!r}{closest(str(exchange), EXCHANGES)}; "
                              f"valid: {', '.join(EXCHANGES)}")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"siglip.init_logit_scale: expected 0 < init_logit_scale <= max_logit_scale "
                              f"({max_logit_scale}), got {init_logit_scale}")
        self.exchange, self.chunked = exchange, bool(chunked)
        self.pairs = check_pairs(pairs, "siglip")
        self.max_logit_scale = float(max_logit_scale)
        p = len(self.pairs)
        self.logit_scale = nn.Parameter(torch.full((p,), math.log(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.full((p,), float(init_logit_bias)), requires_grad=learn_logit_scale)
        self.modalities = tuple(dict.fromkeys(m for pair in self.pairs for m in pair))

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch,
                model: nn.Module | None = None) -> ObjectiveOutput:
        """Mean over pairs of the masked sigmoid loss (summed over nested sizes when set, each size through the
        same exchange), plus per-pair accuracy, scale and bias (and each nested size's loss)."""
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        losses, metrics = [], {}
        exits, views = self.nesting.active(), LayerViews(model, outputs, batch, "siglip.starbucks")
        for i, (a, b) in enumerate(self.pairs):
            ea, eb = embedding_of(outputs, a, "siglip"), embedding_of(outputs, b, "siglip")
            valid = present(batch, a, ea) & present(batch, b, eb)
            if self.nesting:
                self.nesting.check_dims(ea.shape[-1], "the embedding size")
                loss, m, per_exit = nested_pair_losses(self.nesting, exits, views, a, b, partial(
                    siglip_loss, logit_scale=scales[i], logit_bias=self.logit_bias[i], exchange=self.exchange,
                    valid=valid, chunked=self.chunked))
                metrics.update({f"{a}_{b}/{k}": v for k, v in per_exit.items()})
            else:
                loss, m = siglip_loss(ea, eb, scales[i], self.logit_bias[i], exchange=self.exchange, valid=valid,
                                      chunked=self.chunked)
            losses.append(loss)
            metrics[f"{a}_{b}/acc"] = m["acc"]
            metrics[f"{b}_{a}/acc"] = m["acc_ba"]
            metrics[f"{a}_{b}/logit_scale"] = scales[i].detach()
            metrics[f"{a}_{b}/logit_bias"] = self.logit_bias[i].detach().float()
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the logit scales and biases."""
        return {"logit_scale", "logit_bias"}


SigLIP.__doc__ = (SigLIP.__doc__ or "") + NESTING_KEYS_DOC
