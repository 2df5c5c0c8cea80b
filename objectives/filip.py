"""FILIP: token-wise late interaction (Yao et al. 2021) for any two encoders that return tokens.

The similarity of samples i (side a) and j (side b) seen from a is the mean over i's valid tokens of
each token's best match among j's valid tokens; seen from b, the same with the roles swapped. Each
direction has its own InfoNCE (rows of a against columns of b, then rows of b against columns of a).
Tokens are the model's per-token projections (``EncoderOutput.token_embedding``, asked for through
``token_modalities``), so the shared space is the one the pooled embeddings live in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.objectives.contrastive import (
    GatherMode,
    bounded_log_scale,
    check_pairs,
    encoder_output,
    gather_features,
    gather_mask,
    loss_world,
    present,
    symmetric_infonce,
)
from mmpt.registry import ConfigError, objectives


def _mean_of_best(sim: Tensor, own_mask: Tensor, other_mask: Tensor, own_dim: int) -> Tensor:
    """Reduce sim (Ra, Rb, Ta, Tb): best over the other side's valid tokens, mean over own valid tokens.
    ``own_dim`` is 2 (a's tokens, a's masks (Ra, Ta)) or 3 (b's)."""
    other_dim = 5 - own_dim
    # other_mask broadcast to sim: (1, Rb, 1, Tb) for own_dim 2, (Ra, 1, Ta, 1) for own_dim 3
    other = other_mask[None, :, None, :] if own_dim == 2 else other_mask[:, None, :, None]
    best = sim.masked_fill(~other, torch.finfo(sim.dtype).min).amax(dim=other_dim)  # (Ra, Rb, T_own)
    # a sample with no valid token on the other side gets 0, not the fill (keeps sums finite)
    has_other = other.any(dim=other_dim)
    best = best.masked_fill(~has_other, 0.0)
    own = own_mask[:, None, :] if own_dim == 2 else own_mask[None, :, :]
    return (best * own).sum(-1) / own.sum(-1).clamp(min=1)


def token_similarity(a: Tensor, a_mask: Tensor, b: Tensor, b_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Late-interaction similarities of every (i, j): (s_ab, s_ba), both (Ra, Rb), fp32.

    a (Ra, Ta, E), b (Rb, Tb, E) token embeddings; masks (R, T) bool, True on real tokens.
    s_ab[i, j]: mean over a_i's valid tokens of the max over b_j's valid tokens of the dot product;
    s_ba[i, j]: mean over b_j's valid tokens of the max over a_i's valid tokens.
    """
    sim = torch.einsum("ikd,jld->ijkl", a.float(), b.float())
    return _mean_of_best(sim, a_mask, b_mask, 2), _mean_of_best(sim, b_mask, a_mask, 3)


def subsample_tokens(x: Tensor, mask: Tensor, max_tokens: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Keep at most ``max_tokens`` tokens per sample, drawn at random among its valid ones (padding is
    drawn only when a sample has fewer valid tokens, and stays masked)."""
    if x.shape[1] <= max_tokens:
        return x, mask
    keys = torch.rand(mask.shape, generator=generator, device=mask.device) + mask.float()  # valid first
    idx = keys.topk(max_tokens, dim=1).indices
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), mask.gather(1, idx)


def filip_loss(
    a: Tensor,
    a_mask: Tensor,
    b: Tensor,
    b_mask: Tensor,
    logit_scale: Tensor,
    *,
    gather: GatherMode,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FILIP InfoNCE of paired samples given their token embeddings; returns (loss, detached metrics).

    a (B, Ta, E), b (B, Tb, E), masks (B, T) bool; logit_scale: the scale (not its log). valid, the
    gather modes, normalisation and metrics are those of :func:`clip_loss`; every rank must pass the
    same shapes. Memory grows as rows x columns x Ta x Tb: subsample tokens for large batches.
    """
    rank, world = loss_world(gather.gather == "local")
    n = a.shape[0]
    if world > 1:
        a_all, b_all = gather_features(a, gather, rank, world), gather_features(b, gather, rank, world)
        am_all, bm_all = gather_mask(a_mask, world), gather_mask(b_mask, world)
        valid_all = gather_mask(valid, world) if valid is not None else None
    else:
        a_all, b_all, am_all, bm_all, valid_all = a, b, a_mask, b_mask, valid
    scale = logit_scale.float()
    local_rows = gather.local_loss and world > 1
    if local_rows:
        logits_ab = scale * token_similarity(a, a_mask, b_all, bm_all)[0]
        logits_ba = scale * token_similarity(a_all, am_all, b, b_mask)[1].T
        labels = torch.arange(n, device=a.device) + rank * n
    else:
        s_ab, s_ba = token_similarity(a_all, am_all, b_all, bm_all)
        logits_ab, logits_ba = scale * s_ab, scale * s_ba.T
        labels = torch.arange(a_all.shape[0], device=a.device)
    rows = slice(None) if local_rows else slice(rank * n, (rank + 1) * n)
    row_valid = None if valid is None else (valid if local_rows else valid_all)
    return symmetric_infonce(logits_ab, logits_ba, labels, own_rows=rows, row_valid=row_valid,
                             col_valid=valid_all, shards=world if local_rows else 1)


def _tokens(outputs: dict[str, EncoderOutput], modality: str) -> tuple[Tensor, Tensor]:
    """(token embeddings, token mask) of ``modality``, with an error naming what is missing."""
    out = encoder_output(outputs, modality, "filip")
    emb = out.get("token_embedding")
    if emb is None:
        raise ValueError(f"filip: encoder output of {modality!r} has no token_embedding; encode it with "
                         f"MultimodalModel(..., tokens=({modality!r},)) (Pretrainer does so from token_modalities)")
    mask = out.mask if out.mask is not None else torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return emb, mask.to(torch.bool)


@objectives.register("filip")
class FILIP(Objective):
    """FILIP token-wise contrastive objective over modality pairs, with a learnable logit scale per pair.

    Reads each side's per-token projected embeddings and token masks (padding never matches and never
    counts). Samples lacking a modality (``batch.present``) are masked out of the pairs they cannot join.

    pairs: modality pairs to contrast, e.g. [[image, text]]. max_tokens: in training, keep at most this
    many random valid tokens per sample and side (0: all), bounding memory (rows x columns x tokens^2).
    gather: how tokens cross ranks: 'local', 'no_grad' or 'with_grad' (as clip). local_loss: each rank
    scores its own rows against all columns. init_logit_scale: starting scale (1/temperature).
    max_logit_scale: upper bound of the scale. learn_logit_scale: train the scale (else fixed at init).
    """

    tiny_configs = ({"pairs": [["image", "text"]], "init_logit_scale": 20.0},
                    {"pairs": [["image", "text"]], "max_tokens": 4})

    def __init__(
        self,
        *,
        pairs: list[list[str]],
        max_tokens: int = 0,
        gather: str = "no_grad",
        local_loss: bool = False,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
    ):
        super().__init__()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ConfigError(f"filip.max_tokens: expected an integer >= 0 (0: every token), got {max_tokens!r}")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"filip.init_logit_scale: expected 0 < init_logit_scale <= max_logit_scale "
                              f"({max_logit_scale}), got {init_logit_scale}")
        self.pairs = check_pairs(pairs, "filip")
        self.max_tokens = max_tokens
        self.gather = GatherMode.parse(gather, local_loss)
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full((len(self.pairs),), math.log(init_logit_scale)),
                                        requires_grad=learn_logit_scale)
        self.modalities = tuple(dict.fromkeys(m for pair in self.pairs for m in pair))
        self.token_modalities = self.modalities

    def _side(self, outputs: dict[str, EncoderOutput], modality: str) -> tuple[Tensor, Tensor]:
        x, mask = _tokens(outputs, modality)
        if self.training and self.max_tokens:
            x, mask = subsample_tokens(x, mask, self.max_tokens)
        return x, mask

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """Mean over pairs of the masked FILIP loss, plus per-pair accuracy and scale."""
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        losses, metrics = [], {}
        for i, (a, b) in enumerate(self.pairs):
            (ta, ma), (tb, mb) = self._side(outputs, a), self._side(outputs, b)
            valid = present(batch, a, ta) & present(batch, b, tb)
            loss, m = filip_loss(ta, ma, tb, mb, scales[i], gather=self.gather, valid=valid)
            losses.append(loss)
            metrics[f"{a}_{b}/acc"] = m["acc"]
            metrics[f"{b}_{a}/acc"] = m["acc_ba"]
            metrics[f"{a}_{b}/logit_scale"] = scales[i].detach()
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the logit scales."""
        return {"logit_scale"}
