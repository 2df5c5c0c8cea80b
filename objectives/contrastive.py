"""CLIP-style contrastive objective: a pure distributed loss function and the module holding logit scales.

``clip_loss`` mirrors OpenCLIP's ``ClipLoss`` flags through :class:`GatherMode` and adds masking for
samples that lack a modality. Shapes stay fixed on every rank (absent samples are masked, never
dropped), so every rank enters the same collectives whatever its batch holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.matryoshka import NESTING_KEYS_DOC, LayerViews, Nesting, nested_pair_losses
from mmpt.nn.precision import full_precision
from mmpt.registry import ConfigError, closest, objectives

GATHER_MODES = ("local", "no_grad", "with_grad")


@dataclass(frozen=True)
class GatherMode:
    """How features cross ranks, mirroring OpenCLIP's ``gather_with_grad`` / ``local_loss`` flags.

    gather: "local" (no exchange, even when distributed), "no_grad" (all_gather without grad, the
    rank's own slot keeps its grad; OpenCLIP's default) or "with_grad" (autograd all_gather).
    local_loss: each rank's rows against all columns (B x N logits instead of N x N). With
    "with_grad", both settings give the single-process gradients of the concatenated batch once
    ranks average gradients (as DDP / DeepSpeed do).
    """

    gather: Literal["local", "no_grad", "with_grad"] = "no_grad"
    local_loss: bool = False

    def __post_init__(self) -> None:
        if self.gather not in GATHER_MODES:
            raise ConfigError(
                f"gather: unknown mode {self.gather!r}{closest(str(self.gather), GATHER_MODES)}; "
                f"valid: {', '.join(GATHER_MODES)}"
            )

    @classmethod
    def parse(cls, gather: str, local_loss: bool = False) -> GatherMode:
        """Build from config values (``gather: with_grad``, ``local_loss: true``); accepts '-' for '_'."""
        return cls(gather.strip().lower().replace("-", "_"), bool(local_loss))  # type: ignore[arg-type]


def loss_world(local: bool = False) -> tuple[int, int]:
    """(rank, world size) a loss exchanges over; (0, 1) when ``local`` or not distributed."""
    if local or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_features(x: Tensor, mode: GatherMode, rank: int, world: int) -> Tensor:
    """Concatenate every rank's (B, ...) features into (world * B, ...) as ``mode`` says."""
    if mode.gather == "with_grad":
        import torch.distributed.nn.functional as dist_nn

        gathered = torch.cat(dist_nn.all_gather(x), dim=0)
        if gathered.requires_grad:
            # On gloo all_gather's backward is an all_to_all that misplaces non-contiguous gradients
            # (an einsum's, as FILIP's): hand it contiguous ones.
            gathered.register_hook(lambda g: g.contiguous())
        return gathered
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    if not mode.local_loss:
        # The gathered copy has no grad; put the rank's own features back so its rows and columns
        # still train this rank's towers (with local_loss the rows already come from `x`).
        parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_mask(valid: Tensor, world: int) -> Tensor:
    """Concatenate every rank's (B, ...) bool mask (sent as uint8: not every backend moves bool)."""
    parts = [torch.empty_like(valid, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, valid.to(torch.uint8).contiguous())
    return torch.cat(parts).bool()


@full_precision
def clip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    *,
    gather: GatherMode,
    logit_bias: Tensor | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (B, E); returns (loss, detached metrics).

    logit_scale: the scale itself (not its log), a scalar or (1,) tensor. valid: optional (B,) bool,
    False where a sample lacks one of the two modalities: its row leaves the loss and its column
    leaves every softmax. The loss is the mean over the valid rows of the global batch, in both
    directions; with ``local_loss`` a rank's loss is its share, so the mean of rank losses is that
    global mean. With no valid row anywhere the loss is a zero that still depends on the inputs.
    Metrics: ``acc`` (top-1 a->b retrieval over this rank's valid rows) and ``acc_ba`` (b->a).
    Logits are computed in fp32 whatever the input dtype. Every rank must pass the same B.
    """
    rank, world = loss_world(gather.gather == "local")
    n_local = a.shape[0]
    if world > 1:
        a_all = gather_features(a, gather, rank, world)
        b_all = gather_features(b, gather, rank, world)
        valid_all = gather_mask(valid, world) if valid is not None else None
    else:
        a_all, b_all, valid_all = a, b, valid

    # bf16 logits lose the ranking of near neighbours at scale 100: softmax in fp32.
    scale = logit_scale.float()
    a, b, a_all, b_all = a.float(), b.float(), a_all.float(), b_all.float()
    local_rows = gather.local_loss and world > 1
    if local_rows:
        logits_ab = scale * a @ b_all.T
        logits_ba = scale * b @ a_all.T
        labels = torch.arange(n_local, device=a.device) + rank * n_local
    else:
        logits_ab = scale * a_all @ b_all.T
        logits_ba = logits_ab.T
        labels = torch.arange(a_all.shape[0], device=a.device)
    if logit_bias is not None:
        logits_ab = logits_ab + logit_bias.float()
        logits_ba = logits_ba + logit_bias.float()

    rows = slice(None) if local_rows else slice(rank * n_local, (rank + 1) * n_local)
    row_valid = None if valid is None else (valid if local_rows else valid_all)
    return symmetric_infonce(logits_ab, logits_ba, labels, own_rows=rows, row_valid=row_valid,
                             col_valid=valid_all, shards=world if local_rows else 1)


def symmetric_infonce(
    logits_ab: Tensor,
    logits_ba: Tensor,
    labels: Tensor,
    *,
    own_rows: slice,
    row_valid: Tensor | None = None,
    col_valid: Tensor | None = None,
    shards: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of (R, N) logits in both directions, row i's positive being column ``labels[i]``;
    returns (loss, detached metrics ``acc`` and ``acc_ba``: top-1 over ``own_rows``, this rank's rows).

    row_valid (R,) and col_valid (N,) bool (both or neither): False for samples lacking a modality;
    their rows leave the loss and their columns every softmax. Masked, the loss is the sum over valid
    rows divided by the count of valid columns / ``shards`` (the ranks splitting the rows between them),
    so the mean of rank losses is the mean over the global batch's valid rows.
    """
    if row_valid is None:
        loss = (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2
        row_weight = None
    else:
        assert col_valid is not None
        absent_cols = ~col_valid.to(logits_ab.device, torch.bool)[None, :]
        # A finite fill (not -inf) keeps rows whose columns are all absent free of NaN; its exp
        # underflows to exactly 0 next to any real logit, so valid rows match the unmasked loss.
        fill = torch.finfo(logits_ab.dtype).min
        logits_ab = logits_ab.masked_fill(absent_cols, fill)
        logits_ba = logits_ba.masked_fill(absent_cols, fill)
        row_valid = row_valid.to(logits_ab.device, torch.bool)
        row_weight = row_valid.to(logits_ab.dtype)
        # Absent rows are ignored (loss and grad exactly 0) rather than weighted by 0: their target
        # logit is the fill, whose cross-entropy overflows to inf and inf * 0 is NaN.
        row_labels = labels.masked_fill(~row_valid, -100)
        per_row = F.cross_entropy(logits_ab, row_labels, reduction="none", ignore_index=-100)
        per_row = per_row + F.cross_entropy(logits_ba, row_labels, reduction="none", ignore_index=-100)
        # Normalise by the global count (per rank share with local rows) so ranks with fewer valid
        # rows are not up-weighted; zero valid rows gives 0 * inputs, keeping backward and collectives.
        count = col_valid.sum().to(logits_ab.dtype).clamp(min=1)
        loss = per_row.sum() / (2 * (count / shards))

    with torch.no_grad():
        local_labels = labels[own_rows]
        hits_ab = (logits_ab[own_rows].argmax(dim=1) == local_labels).float()
        hits_ba = (logits_ba[own_rows].argmax(dim=1) == local_labels).float()
        if row_weight is None:
            metrics = {"acc": hits_ab.mean(), "acc_ba": hits_ba.mean()}
        else:
            w = row_weight[own_rows]
            metrics = {"acc": (hits_ab * w).sum() / w.sum().clamp(min=1),
                       "acc_ba": (hits_ba * w).sum() / w.sum().clamp(min=1)}
    return loss, metrics


class _BoundedLogScale(torch.autograd.Function):
    """min(x, bound) whose gradient, above the bound, passes only where it would lower x."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        # Save a mask, not the parameter: ZeRO-3 may release the parameter's data before backward.
        ctx.save_for_backward(x > bound)
        return x.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (above,) = ctx.saved_tensors
        return grad.masked_fill(above & (grad < 0), 0.0), None


def bounded_log_scale(log_scale: Tensor, bound: float) -> Tensor:
    """``log_scale`` capped at ``bound`` in value, recoverable in gradient.

    A plain clamp has zero gradient above the bound, so a parameter that got past it (momentum carries
    it on) never returns. OpenCLIP clamps the parameter in place after each step; clamping it in place
    before use is the same idea. Under DeepSpeed both edit a copy: with bf16/fp16 or ZeRO-1/2/3 the
    optimizer's fp32 master (at ZeRO-3 a partition of it) is written back into the module after every
    step, so the master drifts on and the clamp would hold only at stage 0 in fp32: training would
    differ between stages. Here the parameter is never written: above the bound a
    gradient that asks for a smaller scale passes (as if unclamped) and one that asks for a larger
    scale is dropped, so the parameter cannot drift further up and comes back as soon as the loss
    asks. It is a pure function of the parameter, the same at every stage and precision; each rank
    gates its own gradient before ranks average, so above the bound the average never pushes up.
    Below the bound it is the identity (OpenCLIP's loss and gradient exactly).
    """
    return _BoundedLogScale.apply(log_scale, bound)


def encoder_output(outputs: dict[str, EncoderOutput], modality: str, objective: str = "clip") -> EncoderOutput:
    """The encoder output of ``modality``, with an error naming what is missing."""
    if modality not in outputs:
        raise KeyError(
            f"{objective}: no encoder output for modality {modality!r} (have {', '.join(outputs) or 'none'}); "
            "every rank must encode every modality of its pairs, even when a batch lacks it"
        )
    return outputs[modality]


def embedding_of(outputs: dict[str, EncoderOutput], modality: str, objective: str = "clip") -> Tensor:
    """The projected embedding of ``modality``, with an error naming what is missing."""
    emb = encoder_output(outputs, modality, objective).embedding
    if emb is None:
        raise ValueError(f"{objective}: encoder output of {modality!r} has no projected embedding")
    return emb


def present(batch: Batch, modality: str, like: Tensor) -> Tensor:
    """(B,) bool presence of ``modality``; all present when the batch carries no mask for it."""
    mask = batch.present.get(modality) if batch is not None else None
    if mask is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return mask.to(device=like.device, dtype=torch.bool)


@objectives.register("clip")
class CLIP(Objective):
    """CLIP / ImageBind contrastive objective over modality pairs, with a learnable logit scale per pair.

    Give ``pairs`` ([[image, text], ...]) or ``anchor`` (bind every other encoded modality to it,
    sharing one logit scale). ``logit_scale`` holds the log of the scale (as OpenCLIP stores it),
    one entry per pair, shape (P,): DeepSpeed cannot broadcast 0-dim parameters, and a plain tensor
    parameter of this module is gathered by ZeRO-3 when this module runs (a ParameterDict is not).
    Samples lacking a modality (``batch.present``) are masked out of the pairs they cannot join.

    pairs: modality pairs to contrast, e.g. [[image, text]]. anchor: instead of pairs, bind every other
    encoded modality to this one (ImageBind). gather: how features cross ranks: 'local', 'no_grad'
    (OpenCLIP's default) or 'with_grad'. local_loss: each rank scores its own rows against all columns
    (less memory). init_logit_scale: starting scale (1/temperature). max_logit_scale: upper bound of the
    scale. learn_logit_scale: train the scale (else fixed at init).
    """

    tiny_configs = ({"pairs": [["image", "text"]], "init_logit_scale": 20.0},)

    def __init__(
        self,
        *,
        pairs: list[list[str]] | None = None,
        anchor: str | None = None,
        gather: str = "no_grad",
        local_loss: bool = False,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        starbucks: list[list[int]] | None = None,
        starbucks_sample: bool = False,
    ):
        super().__init__()
        self.nesting = Nesting("clip", matryoshka_dims, matryoshka_weights, starbucks, starbucks_sample)
        self.uses_model = self.nesting.uses_layers  # layer exits run the towers again
        if (pairs is None) == (anchor is None):
            raise ConfigError(
                "clip: give exactly one of `pairs` (e.g. [[image, text]]) or `anchor` (e.g. text), "
                f"got pairs={pairs!r}, anchor={anchor!r}"
            )
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(
                f"clip.init_logit_scale: expected 0 < init_logit_scale <= max_logit_scale ({max_logit_scale}), "
                f"got {init_logit_scale}"
            )
        self.gather = GatherMode.parse(gather, local_loss)
        self.anchor = anchor
        self.pairs: list[tuple[str, str]] = [] if pairs is None else check_pairs(pairs)
        self.max_logit_scale = float(max_logit_scale)
        # Anchor mode learns its pairs only at forward time, so they share one scale.
        self.scale_names = [f"{a}__{b}" for a, b in self.pairs] or [f"{anchor}__all"]
        self.logit_scale = nn.Parameter(
            torch.full((len(self.scale_names),), math.log(init_logit_scale)), requires_grad=learn_logit_scale
        )
        # An anchor binds whatever is encoded: reading no fixed list lets the pretrainer encode all.
        self.modalities = tuple(dict.fromkeys(m for p in self.pairs for m in p))

    def pairs_for(self, outputs: dict[str, EncoderOutput]) -> list[tuple[str, str]]:
        """The pairs this forward contrasts, in the same order on every rank."""
        if self.anchor is None:
            return self.pairs
        if self.anchor not in outputs:
            raise KeyError(f"clip: anchor modality {self.anchor!r} not encoded (have {', '.join(outputs)})")
        others = sorted(m for m in outputs if m != self.anchor)
        if not others:
            raise ValueError(f"clip: anchor {self.anchor!r} has no other encoded modality to bind")
        return [(self.anchor, m) for m in others]

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch,
                model: nn.Module | None = None) -> ObjectiveOutput:
        """Mean over pairs of the masked symmetric contrastive loss (summed over nested sizes when set), plus
        per-pair accuracy and scale (and each nested size's loss)."""
        # fp32: a bf16 bound (log 100 -> 4.59) would cap the scale at 98.9, not 100.
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        losses, metrics = [], {}
        exits, views = self.nesting.active(), LayerViews(model, outputs, batch, "clip.starbucks")
        for i, (a, b) in enumerate(self.pairs_for(outputs)):
            ea, eb = embedding_of(outputs, a), embedding_of(outputs, b)
            valid = present(batch, a, ea) & present(batch, b, eb)
            scale = scales[0 if self.anchor is not None else i]
            if self.nesting:
                self.nesting.check_dims(ea.shape[-1], "the embedding size")
                loss, m, per_exit = nested_pair_losses(self.nesting, exits, views, a, b, partial(
                    clip_loss, logit_scale=scale, gather=self.gather, valid=valid))
                metrics.update({f"{a}_{b}/{k}": v for k, v in per_exit.items()})
            else:
                loss, m = clip_loss(ea, eb, scale, gather=self.gather, valid=valid)
            losses.append(loss)
            metrics[f"{a}_{b}/acc"] = m["acc"]
            metrics[f"{b}_{a}/acc"] = m["acc_ba"]
            metrics[f"{a}_{b}/logit_scale"] = scale.detach()
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the logit scales."""
        return {"logit_scale"}


CLIP.__doc__ = (CLIP.__doc__ or "") + NESTING_KEYS_DOC


def check_pairs(pairs: list[list[str]], objective: str = "clip") -> list[tuple[str, str]]:
    """Validate ``pairs`` from a recipe: a non-empty list of distinct [modality_a, modality_b]."""
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(m, str) for m in pair):
            raise ConfigError(f"{objective}.pairs[{i}]: expected [modality_a, modality_b], got {pair!r}")
        a, b = pair
        if a == b:
            raise ConfigError(f"{objective}.pairs[{i}]: a modality cannot be paired with itself ({a!r})")
        if (a, b) in out or (b, a) in out:
            raise ConfigError(f"{objective}.pairs[{i}]: pair {[a, b]} listed twice")
        out.append((a, b))
    if not out:
        raise ConfigError(f"{objective}.pairs: expected at least one [modality_a, modality_b]")
    return out
