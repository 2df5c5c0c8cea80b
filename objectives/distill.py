"""Distillation from frozen teacher models: contrastive KD (OpenCLIP's ``DistillClipLoss``) and feature matching.

A teacher is an mmpt export named in the recipe (``teachers: [teacher.safetensors]``); the pretrainer
builder loads each one under the rules for untrusted files and hands this objective the frozen model
(``Objective.frozen_models``). The teacher encodes the same batch fields as the student, in inference
mode and without gradients; as a submodule of the trained module it is partitioned under ZeRO-3 like any
frozen part, but it is not part of the student: checkpoints and exports leave it out, and a model loaded
from a file comes with no teacher (its ``teachers`` key is reset like a weight source).

Several teachers (MetaCLIP 2 / Perception Encoder style) average their terms with ``teacher_weights``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.precision import full_precision
from mmpt.objectives.contrastive import (
    GatherMode,
    bounded_log_scale,
    check_pairs,
    embedding_of,
    gather_features,
    gather_mask,
    loss_world,
    present,
)
from mmpt.registry import ConfigError, objectives


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-row cross-entropy of the student's softmax against the teacher's (OpenCLIP's ``dist_loss`` rows)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)


@full_precision
def contrastive_kd(a: Tensor, b: Tensor, scale: Tensor, ta: Tensor, tb: Tensor, teacher_scale: Tensor, *,
                   gather: GatherMode, valid: Tensor | None = None) -> Tensor:
    """KD between the student's a<->b similarity softmaxes and the teacher's, both directions averaged.

    a, b: the student's (B, E) embeddings; ta, tb: the teacher's (B, E') (no gradient). With every row
    valid on one process this is ``DistillClipLoss``'s ``distill_loss``. Across ranks the features are
    gathered as ``gather`` says, like :func:`~objectives.contrastive.clip_loss`: the loss is the mean over
    the valid rows of the global batch (a rank's share with ``local_loss``). Invalid columns leave every
    softmax; invalid rows leave the mean.
    """
    rank, world = loss_world(gather.gather == "local")
    teacher_gather = GatherMode("no_grad", gather.local_loss)
    if world > 1:
        a_all, b_all = gather_features(a, gather, rank, world), gather_features(b, gather, rank, world)
        ta_all, tb_all = (gather_features(t, teacher_gather, rank, world) for t in (ta, tb))
        valid_all = gather_mask(valid, world) if valid is not None else None
    else:
        a_all, b_all, ta_all, tb_all, valid_all = a, b, ta, tb, valid
    local_rows = gather.local_loss and world > 1
    rows = slice(rank * a.shape[0], (rank + 1) * a.shape[0]) if local_rows else slice(None)
    s, t = scale.float(), teacher_scale.float()
    a_all, b_all, ta_all, tb_all = a_all.float(), b_all.float(), ta_all.float(), tb_all.float()
    student_ab, teacher_ab = s * a_all[rows] @ b_all.T, t * ta_all[rows] @ tb_all.T
    student_ba, teacher_ba = s * b_all[rows] @ a_all.T, t * tb_all[rows] @ ta_all.T
    if valid_all is None:
        per_row = soft_cross_entropy(student_ab, teacher_ab) + soft_cross_entropy(student_ba, teacher_ba)
        return per_row.mean() / 2
    cols = valid_all.to(a_all.device)
    hide = ~cols[None, :]
    student_ab, student_ba = student_ab.masked_fill(hide, -1e4), student_ba.masked_fill(hide, -1e4)
    teacher_ab, teacher_ba = teacher_ab.masked_fill(hide, -1e4), teacher_ba.masked_fill(hide, -1e4)
    row_valid = cols[rows].to(student_ab.dtype)
    per_row = (soft_cross_entropy(student_ab, teacher_ab) + soft_cross_entropy(student_ba, teacher_ba)) * row_valid
    shards = world if local_rows else 1
    return per_row.sum() / (2 * (cols.sum().to(per_row.dtype).clamp(min=1) / shards))


def feature_distance(student: Tensor, teacher: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean cosine distance between the student's and the teacher's embeddings over the valid rows."""
    dist = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if valid is None:
        return dist.mean()
    w = valid.to(dist.dtype)
    return (dist * w).sum() / w.sum().clamp(min=1)


def teacher_logit_scale(teacher: nn.Module, pair: tuple[str, str], where: str) -> float:
    """The scale (not its log) the teacher's own contrastive objective uses for ``pair``."""
    for obj in getattr(teacher, "objectives", {}).values():
        pairs = [tuple(p) for p in getattr(obj, "pairs", ())]
        log_scale = getattr(obj, "logit_scale", None)
        if log_scale is None:
            continue
        for i, p in enumerate(pairs):
            if p in (pair, pair[::-1]):
                bound = math.log(getattr(obj, "max_logit_scale", math.inf))
                return float(min(log_scale.detach().float().reshape(-1)[i], bound).exp())
        if getattr(obj, "anchor", None) in pair:
            return float(log_scale.detach().float().reshape(-1)[0].exp())
    raise ConfigError(f"{where}: the teacher has no contrastive objective scoring {list(pair)}; set "
                      "distill.teacher_logit_scale (e.g. 100)")


@objectives.register("distill")
class Distill(Objective):
    """Distil frozen teachers into the student: contrastive KD over modality pairs plus feature matching.

    teachers: mmpt exports of the teacher models (frozen; they must encode the pairs' modalities from the
    same batch fields as the student: same image size, same tokenizer). pairs: modality pairs for
    contrastive KD, e.g. [[image, text]]. kd_weight: weight of the KD term (the student's a->b and b->a
    softmax over the batch against the teacher's, as OpenCLIP's DistillClipLoss). feature_weight: weight of
    the feature term (cosine distance between the student's and each teacher's embedding of every pair
    modality; needs the same model.embed_dim). teacher_weights: one weight per teacher (default equal).
    teacher_logit_scale: the teachers' scale (default: each teacher's own contrastive objective's).
    init_logit_scale / max_logit_scale / learn_logit_scale: the student's KD scale, as clip's. gather /
    local_loss: how features cross ranks, as clip's (default: with_grad + local_loss, the gradients of the
    whole batch at every world size).
    """

    frozen_models = ("teachers",)
    tiny_configs = ({"pairs": [["image", "text"]], "teacher_logit_scale": 50.0},)
    weight_sources = {"teachers": []}  # a model loaded from a file reads no other file: it has no teacher
    uses_model = False

    def __init__(self, *, teachers: list[Any] | None = None, pairs: list[list[str]] | None = None,
                 kd_weight: float = 1.0, feature_weight: float = 0.0, teacher_weights: list[float] | None = None,
                 teacher_logit_scale: float | None = None, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0, learn_logit_scale: bool = True, gather: str = "with_grad",
                 local_loss: bool = True):
        super().__init__()
        self.pairs = check_pairs(pairs or [], "distill")
        self.modalities = tuple(dict.fromkeys(m for p in self.pairs for m in p))
        teachers = list(teachers or [])
        n_teachers = len(teachers)
        # Paths are what config validation builds with (the pretrainer builder passes the loaded models).
        teachers = [t for t in teachers if not isinstance(t, str)]
        weights = [1.0] * n_teachers if teacher_weights is None else [float(w) for w in teacher_weights]
        if len(weights) != n_teachers or any(w < 0 for w in weights) or (n_teachers and sum(weights) <= 0):
            raise ConfigError(f"distill.teacher_weights: expected {n_teachers} non-negative weights, got "
                              f"{teacher_weights!r}")
        if kd_weight < 0 or feature_weight < 0 or kd_weight + feature_weight <= 0:
            raise ConfigError(f"distill: expected non-negative kd_weight and feature_weight, not both 0 (got "
                              f"{kd_weight}, {feature_weight})")
        self.kd_weight, self.feature_weight = float(kd_weight), float(feature_weight)
        self.teacher_weights = weights
        self.gather = GatherMode.parse(gather, local_loss)
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full((len(self.pairs),), math.log(init_logit_scale)),
                                        requires_grad=learn_logit_scale)
        scales = [[float(teacher_logit_scale) if teacher_logit_scale is not None
                   else teacher_logit_scale_of(t, p, i) for p in self.pairs] for i, t in enumerate(teachers)]
        # Not persistent: it comes with the teachers, which are not part of the model either.
        self.register_buffer("teacher_scales", torch.tensor(scales, dtype=torch.float32).reshape(
            len(teachers), len(self.pairs)), persistent=False)
        # The teachers' towers and heads; their objectives are not needed once the scales are read.
        self.teachers = nn.ModuleList([getattr(t, "model", t) for t in teachers])
        for t in self.teachers:
            t.requires_grad_(False)
            t.eval()
        self._register_state_dict_hook(_drop_teachers)
        self.register_load_state_dict_post_hook(_teachers_not_missing)

    def train(self, mode: bool = True) -> Distill:
        """Train mode for the student's parameters only: teachers stay in inference mode (no dropout)."""
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """Weighted KD and feature terms averaged over teachers and pairs."""
        if not len(self.teachers):
            raise ConfigError("distill: no teacher: list export files under distill.teachers (a model loaded from "
                              "a file carries none)")
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        total, metrics = [], {}
        for ti, teacher in enumerate(self.teachers):
            with torch.no_grad():
                taught = teacher(batch.fields, list(self.modalities))
            terms = []
            for pi, (a, b) in enumerate(self.pairs):
                ea, eb = embedding_of(outputs, a, "distill"), embedding_of(outputs, b, "distill")
                ta, tb = embedding_of(taught, a, "distill teacher"), embedding_of(taught, b, "distill teacher")
                valid = present(batch, a, ea) & present(batch, b, eb)
                term = ea.new_zeros((), dtype=torch.float32)
                if self.kd_weight:
                    kd = contrastive_kd(ea, eb, scales[pi], ta, tb, self.teacher_scales[ti, pi], gather=self.gather,
                                        valid=valid)
                    metrics[f"t{ti}/{a}_{b}/kd"] = kd.detach()
                    term = term + self.kd_weight * kd
                if self.feature_weight:
                    feat = (feature_distance(ea, ta, valid) + feature_distance(eb, tb, valid)) / 2
                    metrics[f"t{ti}/{a}_{b}/feature"] = feat.detach()
                    term = term + self.feature_weight * feat
                terms.append(term)
            total.append(self.teacher_weights[ti] * torch.stack(terms).mean())
        for pi, (a, b) in enumerate(self.pairs):
            metrics[f"{a}_{b}/logit_scale"] = scales[pi].detach()
        return ObjectiveOutput(loss=torch.stack(total).sum() / sum(self.teacher_weights), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the student's KD scales."""
        return {"logit_scale"}


def teacher_logit_scale_of(teacher: nn.Module, pair: tuple[str, str], index: int) -> float:
    """:func:`teacher_logit_scale` of teacher ``index``, with the error naming it."""
    return teacher_logit_scale(teacher, pair, f"distill.teachers[{index}]")


def _drop_teachers(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the teachers are borrowed, not part of the model (checkpoints and exports skip them)."""
    for key in [k for k in state if k.startswith(prefix + "teachers.")]:
        del state[key]


def _teachers_not_missing(module: nn.Module, incompatible: Any) -> None:
    """Load hook: a state without the teachers' tensors is complete (they come from their own files)."""
    own = {f"teachers.{k}" for k in module.teachers.state_dict()}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if k[k.find("teachers."):] not in own or "teachers." not in k]
