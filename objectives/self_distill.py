"""Self-distillation from an EMA teacher (SigLIP 2's additions to SigLIP): SILC and TIPS.

The teacher is the student's own tower and head (plus this objective's projection head) kept as an
exponential moving average (:class:`EMATeacher`, reusable by any objective). It is built by the pretrainer
builder from the student's own config section (``Objective.copied_modalities``) before anything is
partitioned, so under ZeRO-3 each teacher parameter is sharded exactly as its student parameter (same shape,
same layout) and the update is a local operation on the shards, ``ema.ds_tensor.mul_(m).add_(student.ds_tensor,
alpha=1 - m)``, with no collective; at stages 0-2 it runs on the full tensors. Teacher parameters never take a
gradient and stay out of the optimizer; checkpoints hold them (a resumed run continues bitwise) and exports
leave them out (``export_excludes``: SigLIP 2 ships the student only).

Two terms, on one teacher forward of each sample's ordinary (global) view:

* SILC (local-to-global, DINO's loss): the student embeds each *local* crop (the data side's extra views,
  ``train_views: 3, view_crop_scale: [0.05, 0.4]``), a projection head maps the embedding to ``prototypes``
  logits, and their softmax at ``student_temp`` matches the teacher's softmax of the global view, centred
  (a running mean over the global batch) and sharpened at ``teacher_temp``.
* TIPS (masked prediction of the teacher's patch features): the student encodes the global view with
  ``mask_ratio`` of its patches dropped (the tower's own ``keep`` path, as ``masked_tokens``), a light decoder
  places a mask token at each dropped patch and predicts the teacher's final patch token there; the loss is the
  mean cosine distance over dropped patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.data.views import view_count, view_fields
from mmpt.nn.layers import init_weights
from mmpt.nn.precision import full_precision
from mmpt.nn.token_encoder import PrefixTokenEncoder, keep_count, random_keep
from mmpt.objectives.contrastive import loss_world
from mmpt.objectives.masked import MaskedDecoder, masked_mean_loss
from mmpt.registry import ConfigError, objectives


def _local(p: Tensor) -> Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 shard, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _whole(p: Tensor) -> bool:
    """Whether ``p.data`` is the whole tensor (always below ZeRO-3; a persistent or gathered parameter at it)."""
    return not hasattr(p, "ds_tensor") or p.data.numel() == p.ds_numel


@torch.no_grad()
def ema_update_(ema: nn.Module, student: nn.Module, momentum: float) -> None:
    """``ema <- momentum * ema + (1 - momentum) * student`` parameter by parameter, on what this rank holds (a
    ZeRO-3 shard: both are partitioned alike, so the shards line up); buffers are copied; momentum 0 copies."""
    pairs = list(zip(ema.named_parameters(), student.named_parameters(), strict=True))
    for (ne, e), (ns, s) in pairs:
        if ne != ns or getattr(e, "ds_shape", e.shape) != getattr(s, "ds_shape", s.shape):
            raise ConfigError(f"EMA teacher: parameter {ne} {tuple(getattr(e, 'ds_shape', e.shape))} does not match "
                              f"the student's {ns} {tuple(getattr(s, 'ds_shape', s.shape))}")
        views = [(_local(e), _local(s))]
        if hasattr(e, "ds_tensor") and _whole(e) and _whole(s):  # persistent at ZeRO-3: the full copy is read too
            views.append((e.data, s.data))
        for te, ts in views:
            if momentum == 0.0:
                te.copy_(ts)
            else:
                te.mul_(momentum).add_(ts.to(te.dtype), alpha=1.0 - momentum)
    for be, bs in zip(ema.buffers(), student.buffers(), strict=True):
        be.copy_(bs)


class EMATeacher(nn.Module):
    """Copies of student modules moved by EMA once per optimizer step.

    ``parts``: name -> module built like the student's module of that name (same parameter names and shapes),
    made frozen here. :meth:`after_forward` is called at the end of every forward of the objective that owns
    it, with the student modules: the first training forward copies the students (momentum 0, before any
    teacher output is needed: call :meth:`start` first), and the last micro-batch of every later optimizer step
    folds the step's student weights in (``micro_batches`` training forwards make one step). Updating at the
    end of a forward, after the teacher has been used and released, means a ZeRO-3 prefetch of the teacher
    never reads shards that change within the step. The teacher of step t is thus the EMA of the student's
    weights at steps 0..t-1. ``forwards`` (training forwards seen) and ``updates`` (EMA updates applied) are
    persistent buffers, so a checkpoint resumes the schedule exactly.
    """

    def __init__(self, parts: dict[str, nn.Module], momentum: float, micro_batches: int = 1):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA teacher: momentum must be in [0, 1), got {momentum}")
        self.parts = nn.ModuleDict(parts).requires_grad_(False).eval()
        self.momentum, self.micro_batches = float(momentum), max(1, int(micro_batches))
        self.register_buffer("forwards", torch.zeros(1, dtype=torch.long))
        self.register_buffer("updates", torch.zeros(1, dtype=torch.long))

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher always runs in inference mode (no dropout, no token drop)."""
        return super().train(False)

    def start(self, students: dict[str, nn.Module]) -> None:
        """Copy the students into a teacher that has never been updated (the first training forward)."""
        if int(self.updates) == 0:
            for name, part in self.parts.items():
                ema_update_(part, students[name], 0.0)
            self.updates += 1

    def after_forward(self, students: dict[str, nn.Module]) -> None:
        """Count a training forward; at the last micro-batch of a step after the first, fold the students in."""
        f = int(self.forwards)
        self.forwards += 1
        if f // self.micro_batches >= 1 and f % self.micro_batches == self.micro_batches - 1:
            for name, part in self.parts.items():
                ema_update_(part, students[name], self.momentum)
            self.updates += 1


def projection_head(embed_dim: int, hidden: int, prototypes: int) -> nn.Module:
    """DINO's projection: MLP to a bottleneck, L2-normalised, then a linear layer onto the prototypes."""
    head = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2), _L2Norm(),
                         nn.Linear(hidden // 2, prototypes, bias=False))
    head.apply(init_weights)
    return head


@full_precision
def project(head: nn.Module, embedding: Tensor) -> Tensor:
    """Prototype logits (B, K) of (B, E) embeddings, in fp32 even inside the towers' bf16 autocast: the teacher's
    temperature (0.04) would multiply bf16's rounding of the logits by 25."""
    return head(embedding.float()).float()


class _L2Norm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=-1)


@full_precision
def silc_loss(student_logits: list[Tensor], teacher_logits: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float, valid: Tensor | None = None) -> Tensor:
    """DINO cross-entropy of each local view's student softmax (``student_logits``: one (B, K) per view) against
    the teacher's centred, sharpened softmax of the global view (B, K); mean over views and valid rows."""
    target = ((teacher_logits.float() - center.float()) / teacher_temp).softmax(-1)
    w = torch.ones(target.shape[0], device=target.device) if valid is None else valid.to(target.device).float()
    terms = [(-(target * (s.float() / student_temp).log_softmax(-1)).sum(-1) * w).sum() / w.sum().clamp_min(1)
             for s in student_logits]
    return torch.stack(terms).mean()


@full_precision
def tips_loss(pred: Tensor, teacher_tokens: Tensor, weight: Tensor) -> Tensor:
    """Mean cosine distance between predicted (B, N, D) and teacher (B, N, D) patch features where ``weight``
    (B, N) is 1 (dropped patches of present samples)."""
    return masked_mean_loss(1 - F.cosine_similarity(pred.float(), teacher_tokens.float(), dim=-1), weight)


@objectives.register("self_distill")
class SelfDistill(Objective):
    """SigLIP 2's self-distillation from an EMA teacher: SILC (local crops vs the global view) and TIPS
    (masked prediction of the teacher's patch features).

    modality: the tower distilled (its data side supplies the local crops as extra views: ``train_views: 3,
    view_crop_scale: [0.05, 0.4]`` gives two). width: that tower's token width (the TIPS decoder's input and
    target size). embed_dim: the model's ``embed_dim`` (the projection head's input). momentum: EMA factor of
    the teacher, per optimizer step. local_weight: weight of the SILC term (0: off). masked_weight: weight of
    the TIPS term (0: off; needs a tower with a stem/trunk split, e.g. image/vit). prototypes: size of the
    projection head's output (DINO's prototypes). head_hidden: its hidden layer's size. student_temp: the
    student's softmax temperature. teacher_temp: the teacher's (sharper, DINO's 0.04). center_momentum: EMA factor of the teacher-logit centre (per training forward, over the global
    batch). mask_ratio: share of patches the TIPS student does not see. decoder_width / decoder_depth /
    decoder_heads: the TIPS decoder.
    """

    uses_model = True
    export_excludes = ("teacher",)
    tiny_configs = ({"modality": "image", "width": 32, "embed_dim": 32, "prototypes": 16, "head_hidden": 16,
                     "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2, "local_weight": 0.0},)

    def __init__(self, *, modality: str = "image", width: int = 768, embed_dim: int = 512, momentum: float = 0.99,
                 local_weight: float = 1.0, masked_weight: float = 1.0, prototypes: int = 1024,
                 head_hidden: int = 512, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, mask_ratio: float = 0.5, decoder_width: int = 128,
                 decoder_depth: int = 1, decoder_heads: int = 4):
        super().__init__()
        if local_weight < 0 or masked_weight < 0 or local_weight + masked_weight == 0:
            raise ConfigError(f"self_distill: local_weight and masked_weight must be >= 0 and not both 0, got "
                              f"{local_weight}, {masked_weight}")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"self_distill.mask_ratio: expected a ratio in (0, 1), got {mask_ratio}")
        if not 0.0 <= center_momentum < 1.0 or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"self_distill: momentum and center_momentum must be in [0, 1), got {momentum}, "
                              f"{center_momentum}")
        if student_temp <= 0 or teacher_temp <= 0:
            raise ConfigError(f"self_distill: temperatures must be > 0, got {student_temp}, {teacher_temp}")
        self.modality, self.width, self.momentum = modality, width, float(momentum)
        self.modalities = ()  # encodes its own views
        self.copied_modalities = (modality,)
        self.local_weight, self.masked_weight = float(local_weight), float(masked_weight)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.center_momentum, self.mask_ratio = float(center_momentum), float(mask_ratio)
        self.proj = projection_head(embed_dim, head_hidden, prototypes)
        self.decoder = MaskedDecoder(width, width, decoder_width, decoder_depth, decoder_heads)
        self.register_buffer("center", torch.zeros(1, prototypes))
        with torch.random.fork_rng(devices=[]):  # overwritten by the first copy: draws nothing from the run's RNG
            # held outside the module tree until adopt_copies makes it part of the teacher
            object.__setattr__(self, "_teacher_proj", projection_head(embed_dim, head_hidden, prototypes))
        self.teacher: EMATeacher | None = None
        self.register_load_state_dict_post_hook(_teacher_may_be_missing)

    def adopt_copies(self, towers: dict[str, nn.Module], heads: dict[str, nn.Module], micro_batches: int) -> None:
        """Take the builder's fresh copies of the tower and head; with this objective's projection head copy they
        make the EMA teacher, updated once per ``micro_batches`` training forwards."""
        proj = self.__dict__.pop("_teacher_proj")
        self.teacher = EMATeacher({"tower": towers[self.modality], "head": heads[self.modality], "proj": proj},
                                  self.momentum, micro_batches)

    def students(self, model: nn.Module) -> dict[str, nn.Module]:
        """The student modules the teacher follows, by the teacher's part names."""
        return {"tower": model.encoders[self.modality], "head": model.heads[self.modality], "proj": self.proj}

    def no_weight_decay(self) -> set[str]:
        """The TIPS decoder's mask token, as MAE."""
        return {"decoder.mask_token"}

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch, model: nn.Module) -> ObjectiveOutput:
        """local_weight x SILC + masked_weight x TIPS, from one teacher forward of the global view."""
        if self.teacher is None:
            raise ConfigError("self_distill: no EMA teacher: build it through the pretrainer builder "
                              "(build_pretrainer), which makes the tower copy it follows")
        if self.modality not in model.encoders or self.modality not in batch.fields:
            raise ConfigError(f"self_distill.modality={self.modality!r}: not encoded by this model or missing from "
                              f"the batch (encoders: {', '.join(model.encoders)})")
        students = self.students(model)
        if self.training:
            self.teacher.start(students)
        fields = batch.fields[self.modality]
        present = batch.present[self.modality]
        global_view = view_fields(fields, 0)
        parts = self.teacher.parts
        with torch.no_grad():
            t_out = parts["tower"](global_view)
            t_logits = project(parts["proj"], F.normalize(parts["head"](t_out.pooled).float(), dim=-1))
        terms, metrics = [], {}
        if self.local_weight:
            n_views = view_count(fields)
            if n_views < 2:
                raise ConfigError(f"self_distill: the '{self.modality}' batch has no local crop: set train_views: 3 "
                                  f"and view_crop_scale: [0.05, 0.4] in model.encoders.{self.modality}")
            s_logits = [project(self.proj, model.encode_fields(self.modality, view_fields(fields, k)).embedding)
                        for k in range(1, n_views)]
            silc = silc_loss(s_logits, t_logits, self.center, self.student_temp, self.teacher_temp, present)
            terms.append(self.local_weight * silc)
            metrics["silc"] = silc.detach()
        if self.masked_weight:
            tips, weight = self._tips(model, global_view, t_out, present)
            terms.append(self.masked_weight * tips)
            metrics["tips"] = tips.detach()
        if self.training:
            self._update_center(t_logits, present)
            self.teacher.after_forward(students)
        with torch.no_grad():
            p = ((t_logits - self.center) / self.teacher_temp).softmax(-1)
            metrics["teacher_entropy"] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        metrics["ema_updates"] = self.teacher.updates[0].float()
        return ObjectiveOutput(loss=torch.stack(terms).sum(), metrics=metrics)

    def _tips(self, model: nn.Module, fields: dict[str, Tensor], t_out: EncoderOutput,
              present: Tensor) -> tuple[Tensor, Tensor]:
        tower = model.encoders[self.modality]
        if not isinstance(tower, PrefixTokenEncoder):
            raise ConfigError(f"self_distill.masked_weight: the {self.modality} tower ({type(tower).__name__}) has no "
                              "stem/trunk split for masked prediction (image/vit has); set masked_weight: 0")
        n = tower.num_patches(fields)
        keep = random_keep(present.shape[0], n, keep_count(n, self.mask_ratio), present.device)
        out = tower({**fields, "keep": keep})  # a module call: ZeRO-3 gathers the tower's parameters
        if out.tokens.shape[-1] != self.width:
            raise ConfigError(f"self_distill.width={self.width}: the {self.modality} tower's tokens are "
                              f"{out.tokens.shape[-1]} wide; set width: {out.tokens.shape[-1]}")
        prefix = out.tokens.shape[1] - keep.shape[1]
        patch_mask = out.extras["patch_mask"]
        pred = self.decoder(out.tokens, keep, out.extras["coords"], prefix, patch_mask)
        teacher_tokens = t_out.tokens[:, t_out.tokens.shape[1] - n:]
        weight = torch.ones(pred.shape[:2], device=pred.device).scatter(1, keep.to(pred.device), 0.0)
        weight = weight * present.to(pred.device).float().unsqueeze(1)
        if patch_mask is not None:
            weight = weight * patch_mask.float()
        return tips_loss(pred, teacher_tokens, weight), weight

    @torch.no_grad()
    def _update_center(self, t_logits: Tensor, present: Tensor) -> None:
        """DINO's centre: EMA of the mean teacher logits over the global batch's present rows."""
        w = present.to(t_logits.device).float()
        stats = torch.cat([(t_logits * w[:, None]).sum(0), w.sum().reshape(1)])
        _, world = loss_world()
        if world > 1:
            dist.all_reduce(stats)
        mean = stats[:-1] / stats[-1].clamp_min(1)
        self.center.mul_(self.center_momentum).add_(mean[None], alpha=1 - self.center_momentum)


def _teacher_may_be_missing(module: SelfDistill, incompatible: Any) -> None:
    """Load hook: an export carries no teacher (``export_excludes``); a state without it restarts the teacher
    from the student at the next training forward."""
    missing = [k for k in incompatible.missing_keys if ".teacher." in f".{k}" or k.startswith("teacher.")]
    if missing and module.teacher is not None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in missing]
        module.teacher.updates.zero_()
        module.teacher.forwards.zero_()

