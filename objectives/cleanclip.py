"""CleanCLIP (Bansal et al., ICCV 2023): multimodal contrastive + in-modality self-supervised contrastive.

    L = clip_weight * L_CLIP + inmodal_weight * mean_m L_SS(m)
    L_SS(m) = -1/N sum_i log( exp(s <e_i, e~_i>) / sum_j exp(s <e_i, e~_j>) )

where e are a modality's embeddings of the ordinary training view, e~ those of an augmented view of the
same samples, and s the CLIP logit scale (one temperature for every term, as CleanCLIP's code shares
``logit_scale``). Fine-tuning a (possibly backdoored) CLIP with it on clean data weakens spurious
trigger-caption associations: each modality must keep its samples apart on its own.

The augmented views come from the data sides (``train_views: 2`` in a tower's encoder section; see
:mod:`mmpt.data.views`): this objective encodes view 1 through the same tower and head
(``uses_model``), so under ZeRO-3 the tower's parameters are fetched by its own forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, ObjectiveOutput
from mmpt.data.views import view_count, view_fields
from mmpt.nn.precision import full_precision
from mmpt.objectives.contrastive import (
    CLIP,
    GatherMode,
    bounded_log_scale,
    embedding_of,
    gather_features,
    gather_mask,
    loss_world,
    present,
    symmetric_infonce,
)
from mmpt.registry import ConfigError, objectives


@full_precision
def inmodal_loss(a: Tensor, b: Tensor, logit_scale: Tensor, *, gather: GatherMode,
                 valid: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CleanCLIP's in-modality term: cross-entropy of each row of ``a`` (B, E) against every row of ``b``, its
    own augmented view being the positive, in one direction (rows ``a``, columns ``b``); features cross ranks
    as :func:`~objectives.contrastive.clip_loss`'s do, and ``valid`` masks absent samples the same way.
    Returns (loss, detached metrics ``acc``: top-1 of the own view over this rank's valid rows)."""
    rank, world = loss_world(gather.gather == "local")
    n_local = a.shape[0]
    if world > 1:
        a_all, b_all = gather_features(a, gather, rank, world), gather_features(b, gather, rank, world)
        valid_all = gather_mask(valid, world) if valid is not None else None
    else:
        a_all, b_all, valid_all = a, b, valid
    local_rows = gather.local_loss and world > 1
    rows_a = a if local_rows else a_all
    logits = logit_scale.float() * rows_a.float() @ b_all.float().T
    labels = torch.arange(rows_a.shape[0], device=a.device) + (rank * n_local if local_rows else 0)
    own = slice(None) if local_rows else slice(rank * n_local, (rank + 1) * n_local)
    row_valid = None if valid is None else (valid if local_rows else valid_all)
    # The same logits in both directions of the symmetric loss: their mean is the one-directional loss.
    loss, metrics = symmetric_infonce(logits, logits, labels, own_rows=own, row_valid=row_valid,
                                      col_valid=valid_all, shards=world if local_rows else 1)
    return loss, {"acc": metrics["acc"]}


@objectives.register("cleanclip")
class CleanCLIP(CLIP):
    """CleanCLIP's fine-tuning objective: ``clip`` over ``pairs`` plus in-modality contrastive terms between
    each ``inmodal`` modality's ordinary view and its augmented view (its data side's ``train_views: 2``).

    pairs / anchor / gather / local_loss / init_logit_scale / max_logit_scale / learn_logit_scale: as
    ``clip`` (the first pair's scale also scales the in-modality terms). inmodal: modalities with an
    in-modality term (default: every modality of the pairs). clip_weight: lambda_1, the weight of the
    multimodal loss. inmodal_weight: lambda_2, the weight of the mean in-modality loss (CleanCLIP: 1 and 1).
    """

    uses_model = True
    tiny_configs = ({"pairs": [["image", "text"]], "init_logit_scale": 20.0},)

    def __init__(self, *, pairs: list[list[str]] | None = None, anchor: str | None = None,
                 inmodal: list[str] | None = None, clip_weight: float = 1.0, inmodal_weight: float = 1.0,
                 gather: str = "no_grad", local_loss: bool = False, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0, learn_logit_scale: bool = True):
        super().__init__(pairs=pairs, anchor=anchor, gather=gather, local_loss=local_loss,
                         init_logit_scale=init_logit_scale, max_logit_scale=max_logit_scale,
                         learn_logit_scale=learn_logit_scale)
        if inmodal is None and anchor is not None:
            raise ConfigError("cleanclip.inmodal: with an anchor, name the modalities with an in-modality term")
        self.inmodal = tuple(inmodal) if inmodal is not None else self.modalities
        if not self.inmodal or len(set(self.inmodal)) != len(self.inmodal):
            raise ConfigError(f"cleanclip.inmodal: expected distinct modality names, got {list(self.inmodal)}")
        if clip_weight < 0 or inmodal_weight < 0 or clip_weight + inmodal_weight == 0:
            raise ConfigError(f"cleanclip: clip_weight and inmodal_weight must be >= 0 and not both 0, got "
                              f"{clip_weight}, {inmodal_weight}")
        self.clip_weight, self.inmodal_weight = float(clip_weight), float(inmodal_weight)
        self.uses_model = True  # after CLIP's __init__, which sets its own
        if self.anchor is None:
            self.modalities = tuple(dict.fromkeys([*self.modalities, *self.inmodal]))

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch,  # type: ignore[override]
                model: nn.Module | None = None) -> ObjectiveOutput:
        """clip_weight x the clip loss + inmodal_weight x the mean in-modality loss (view 0 against view 1)."""
        if model is None:
            raise ValueError("cleanclip: forward needs the model (it encodes the augmented views)")
        clip_out = super().forward(outputs, batch, model)
        scale = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()[0]
        metrics = dict(clip_out.metrics)
        terms = []
        for m in self.inmodal:
            fields = batch.fields.get(m, {})
            if view_count(fields) < 2:
                raise ConfigError(f"cleanclip: the '{m}' batch has no augmented view: set train_views: 2 in "
                                  f"model.encoders.{m} (its data side then makes one)")
            emb = embedding_of(outputs, m, "cleanclip")
            augmented = model.encode_fields(m, view_fields(fields, 1)).embedding
            loss, m_metrics = inmodal_loss(emb, augmented, scale, gather=self.gather, valid=present(batch, m, emb))
            terms.append(loss)
            metrics[f"{m}_inmodal/acc"] = m_metrics["acc"]
            metrics[f"{m}_inmodal/loss"] = loss.detach()
        metrics["clip/loss"] = clip_out.loss.detach()
        total = self.clip_weight * clip_out.loss + self.inmodal_weight * torch.stack(terms).mean()
        return ObjectiveOutput(loss=total, metrics=metrics)
