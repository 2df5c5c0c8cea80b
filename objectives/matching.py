"""Matching (UNITER / ALBEF / BLIP ITM) for any two encoders that return tokens.

A fusion module lets one modality's tokens (the *query* side, first of a pair) attend to the other's
(the *key* side) and a 2-way head on its first token says matched / unmatched. Each positive pair of the
batch gets one hard negative per direction, drawn from the same step's contrastive similarity
(∝ softmax over the candidates, ALBEF): a key-side negative for the query and a query-side negative for
the key, so the matching batch is 3B. A candidate is never a negative of a sample it is *the same item*
as: the same sample, identical inputs of either modality (so duplicate captions: equal token ids), the
same normalised caption text or the same source id when the batch carries them (``batch.meta``). A row
with no valid candidate leaves the loss and is counted (``no_negative``). With ``gather: with_grad``
(BLIP) the candidates are the global batch: token features cross ranks with gradient, so a rank's
negatives train the towers of the rank they came from.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.layers import Block, CrossBlock, init_weights
from mmpt.nn.precision import full_precision
from mmpt.objectives.contrastive import (
    GatherMode,
    bounded_log_scale,
    check_pairs,
    embedding_of,
    encoder_output,
    gather_features,
    gather_mask,
    loss_world,
    present,
)
from mmpt.registry import ConfigError, objectives

NEGATIVES = ("hard", "random")
GATHERS = ("local", "with_grad")
FEATURES = ("token_embedding", "tokens")
# Coefficients of the two fingerprint projections: irrational steps, so no two different integer inputs
# project to the same pair of numbers short of float64 rounding (see ``input_fingerprints``).
_STEPS = (0.6180339887498949, 0.41421356237309515)


class Fusion(nn.Module):
    """Query tokens (with a learned first token prepended) attend to themselves and to the key tokens,
    ``depth`` times; a linear head on the fused first token gives matched / unmatched logits (N, 2)."""

    def __init__(self, query_width: int, key_width: int, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.query_in = nn.Linear(query_width, width)
        self.first = nn.Parameter(torch.zeros(1, 1, width))
        self.self_blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.cross_blocks = nn.ModuleList(CrossBlock(width, heads, key_width, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.first, std=0.02)

    def forward(self, query: Tensor, query_mask: Tensor, key: Tensor, key_mask: Tensor) -> Tensor:
        """(N, 2) float logits [unmatched, matched] of N (query, key) token sequences with bool masks."""
        query, query_mask = _trim(query, query_mask)
        key, key_mask = _trim(key, key_mask)
        x = self.query_in(query)
        x = torch.cat([self.first.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        mask = torch.cat([query_mask.new_ones(query_mask.shape[0], 1), query_mask], 1)
        # A sample with no real key token (an absent modality's placeholder) would make every attention
        # weight NaN; such rows are out of the loss, so let them attend to their placeholder tokens.
        key_mask = key_mask | ~key_mask.any(1, keepdim=True)
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks, strict=True):
            x = cross_block(self_block(x, mask), key, key_mask)
        return self.head(self.norm(x[:, 0])).float()


def _trim(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing positions that are padding in every row (exact: they are masked everywhere); short
    captions in a long context otherwise cost the fusion most of its time."""
    real = mask.any(0).nonzero()
    end = int(real.max()) + 1 if real.numel() else 1
    return tokens[:, :end], mask[:, :end]


def sample_negatives(scores: Tensor, forbidden: Tensor) -> tuple[Tensor, Tensor]:
    """One column per row drawn with probability ∝ softmax(scores row) over the allowed columns.

    scores (R, C); forbidden (R, C) bool, True where a column may not be drawn (the row's own item,
    absent candidates). Returns (index (R,), ok (R,) bool): a row with no allowed column gets ok False
    and an arbitrary index. One ``torch.multinomial`` call for all rows, from torch's global RNG.
    """
    ok = ~forbidden.all(1)
    logits = scores.detach().float().masked_fill(forbidden, float("-inf"))
    # guarded rows draw from a uniform dummy instead of an all -inf row (NaN weights)
    weights = torch.softmax(logits.masked_fill(~ok[:, None], 0.0), dim=1)
    return torch.multinomial(weights, 1).squeeze(1), ok


def input_fingerprints(fields: dict[str, Tensor]) -> Tensor:
    """(B, 2) int64: equal for samples whose fields are equal (identical captions, identical images).

    Each row's fields are projected on two fixed irrational sequences in float64 (bits returned as int64,
    so they travel through integer collectives). The sequences depend on the position only, so trailing
    zeros (padding, a batch trimmed to its longest caption) do not change a fingerprint.
    """
    b = next(iter(fields.values())).shape[0]
    out = torch.zeros(b, 2, dtype=torch.float64)
    for f, name in enumerate(sorted(fields)):
        x = fields[name].detach().reshape(b, -1).to("cpu", torch.float64)
        pos = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)
        basis = torch.stack([(pos * s + f * 0.1).frac() + 0.5 for s in _STEPS], 1)
        out += x @ basis
    return out.view(torch.int64)


def text_hash(text: str) -> int:
    """A 62-bit non-negative hash of a string, the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def identity_keys(batch: Batch | None, modalities: tuple[str, str], source_key: str | None, first: int,
                  n: int) -> Tensor:
    """(n, K, 2) int64: samples equal in any of the K keys are the same item and never each other's negatives.

    Keys: the global sample index (``first`` + row), each modality's input fingerprint, the normalised
    caption text (``meta['txt']``) and ``json[source_key]`` where the batch carries them. A missing value
    gets a negative number unique to the sample, so two missing values never match.
    """
    from mmpt.data.captions import normalise_caption

    index = torch.arange(first, first + n, dtype=torch.int64)
    missing = torch.stack([-1 - index, -1 - index], 1)
    keys = [torch.stack([index, index], 1)]
    fields = batch.fields if batch is not None else {}
    keys += [input_fingerprints(fields[m]) for m in modalities if m in fields and fields[m]]
    meta = batch.meta if batch is not None else {}
    texts = [normalise_caption(t) if isinstance(t, str) else None for t in meta.get("txt") or []]
    sources = [j.get(source_key) if isinstance(j, dict) and source_key else None for j in meta.get("json") or []]
    for values in (texts, sources):
        if len(values) == n and any(v is not None for v in values):
            hashed = torch.tensor([text_hash(str(v)) if v is not None else -1 for v in values], dtype=torch.int64)
            keys.append(torch.where((hashed >= 0)[:, None], hashed[:, None].expand(-1, 2), missing))
    return torch.stack(keys, 1)


def same_item(rows: Tensor, cols: Tensor) -> Tensor:
    """(R, C) bool from identity keys (R, K, 2) and (C, K, 2): True where any key matches."""
    return (rows[:, None] == cols[None]).all(-1).any(-1)


def itm_loss(fusion: nn.Module, query: Tensor, query_mask: Tensor, key: Tensor, key_mask: Tensor,
             query_all: Tensor, query_mask_all: Tensor, key_all: Tensor, key_mask_all: Tensor,
             neg_key: Tensor, neg_query: Tensor, weights: Tensor, balance: bool = True
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Matching cross-entropy of the 3B batch: B positives (query_i, key_i), B key-side negatives
    (query_i, key_all[neg_key_i]) and B query-side negatives (query_all[neg_query_i], key_i).

    weights (3B,) float: 1 where the row counts, 0 where it does not (absent modality, no negative).
    Returns (loss, logits (3B, 2), labels (3B,)). The loss is the mean over counted rows, or with
    ``balance`` the mean of the positives' mean and the negatives' mean (each class half the loss);
    a zero that still depends on the inputs when nothing counts.
    """
    b = query.shape[0]
    q = torch.cat([query, query, query_all[neg_query]])
    qm = torch.cat([query_mask, query_mask, query_mask_all[neg_query]])
    k = torch.cat([key, key_all[neg_key], key])
    km = torch.cat([key_mask, key_mask_all[neg_key], key_mask])
    logits = fusion(q, qm, k, km)
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
    per_row = F.cross_entropy(logits, labels, reduction="none") * weights
    if not balance:
        return per_row.sum() / weights.sum().clamp(min=1), logits, labels
    pos, neg = per_row[:b].sum() / weights[:b].sum().clamp(min=1), per_row[b:].sum() / weights[b:].sum().clamp(min=1)
    return (pos + neg) / 2, logits, labels


def _gather_tokens(tokens: Tensor, mask: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """Every rank's tokens (with gradient) and masks, padded to the longest token count of any rank."""
    length = torch.tensor([tokens.shape[1]], device=tokens.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    pad = int(max(int(x) for x in lengths)) - tokens.shape[1]
    if pad:
        tokens = F.pad(tokens, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return gather_features(tokens, GatherMode("with_grad"), 0, world), gather_mask(mask, world)


def _gather_plain(x: Tensor, world: int) -> Tensor:
    """Every rank's (B, ...) tensor, without gradient (negatives are sampled from it, queues filled)."""
    return gather_features(x, GatherMode("no_grad", local_loss=True), 0, world)


@objectives.register("itm")
class ITM(Objective):
    """Image-text matching (ALBEF / BLIP ITM) with hard negatives, for any pair of token encoders.

    pairs: [[query, key], ...]: the query modality's tokens attend to the key modality's (e.g. [[text,
    image]], ALBEF's text-side fusion). widths: the token width of each paired modality's tower, e.g.
    {text: 128, image: 256}. width: fusion width. depth: fusion layers (self-attention + cross-attention).
    heads: fusion attention heads. mlp_ratio: fusion MLP hidden size over width. negatives: 'hard' (∝
    softmax of the step's contrastive similarity, ALBEF) or 'random' (uniform over valid candidates).
    negative_logit_scale: scale of the cosine similarities in that softmax (1/temperature). source_key:
    json field naming a sample's source; samples sharing it are never each other's negatives (needs the
    json in the batch's meta). gather: 'local' (negatives from this rank's batch) or 'with_grad' (from
    the global batch, tokens gathered with gradient, BLIP). features: what the fusion reads: 'token_embedding'
    (every token through the model's projection head into the contrastive space, L2-normalised; every width
    is then model.embed_dim) or 'tokens' (the towers' own token features). balance: average the positive
    and the negative rows' losses separately, each half of the loss (ALBEF: a plain mean over the 3B rows;
    from scratch that plain mean sat at the 1:2 prior on the demo data). hard_warmup: training steps over
    which the sampling scale ramps linearly from 0 (uniform: random negatives) to negative_logit_scale, so
    the fusion learns on easy negatives before the hard ones (0: hard from the first step, ALBEF).
    """

    tiny_configs = ({"pairs": [["text", "image"]], "widths": {"text": 32, "image": 32}, "width": 16, "depth": 1,
                     "heads": 2},
                    {"pairs": [["image", "text"]], "widths": {"text": 32, "image": 32}, "width": 16, "depth": 1,
                     "heads": 2, "features": "tokens"})

    def __init__(
        self,
        *,
        pairs: list[list[str]],
        widths: dict[str, int],
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        negatives: str = "hard",
        negative_logit_scale: float = 1 / 0.07,
        source_key: str | None = None,
        gather: str = "local",
        features: str = "token_embedding",
        balance: bool = True,
        hard_warmup: int = 0,
    ):
        super().__init__()
        self.pairs = check_pairs(pairs, "itm")
        self.modalities = tuple(dict.fromkeys(m for p in self.pairs for m in p))
        for m in self.modalities:
            w = widths.get(m)
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ConfigError(f"itm.widths.{m}: expected the token width of the '{m}' tower (a positive "
                                  f"integer), got {w!r}")
        if negatives not in NEGATIVES:
            raise ConfigError(f"itm.negatives: expected one of {', '.join(NEGATIVES)}, got {negatives!r}")
        if gather not in GATHERS:
            raise ConfigError(f"itm.gather: expected one of {', '.join(GATHERS)}, got {gather!r}")
        if features not in FEATURES:
            raise ConfigError(f"itm.features: expected one of {', '.join(FEATURES)}, got {features!r}")
        if not negative_logit_scale > 0:
            raise ConfigError(f"itm.negative_logit_scale: expected > 0, got {negative_logit_scale}")
        self.widths = {m: int(widths[m]) for m in self.modalities}
        self.negatives, self.gather, self.source_key, self.features = negatives, gather, source_key, features
        self.balance = bool(balance)
        if isinstance(hard_warmup, bool) or not isinstance(hard_warmup, int) or hard_warmup < 0:
            raise ConfigError(f"itm.hard_warmup: expected a number of steps >= 0, got {hard_warmup!r}")
        self.hard_warmup = hard_warmup
        # training forwards so far (a buffer: checkpoints carry it, so a resumed run ramps on where it was)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        # From scratch, a fusion over the towers' own tokens stayed at the matched/unmatched prior on the
        # demo data (their token spaces are unrelated); over the shared contrastive space it learned at once.
        self.token_modalities = self.modalities if features == "token_embedding" else ()
        self.negative_logit_scale = float(negative_logit_scale)
        self.fusions = nn.ModuleDict({
            f"{q}__{k}": Fusion(self.widths[q], self.widths[k], width, depth, heads, mlp_ratio) for q, k in self.pairs})
        self._warned_source = False

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """Mean over pairs of the 3B matching loss, with accuracy and negative-sampling metrics per pair."""
        losses, metrics = [], {}
        if self.training:
            self.step += 1
        for q, k in self.pairs:
            loss, m = self._pair_loss(q, k, outputs, batch)
            losses.append(loss)
            metrics.update({f"{q}_{k}/{name}": v for name, v in m.items()})
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def _pair_loss(self, q: str, k: str, outputs: dict[str, EncoderOutput], batch: Batch
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        q_tok, q_mask = self.inputs_of(encoder_output(outputs, q, "itm"), q)
        k_tok, k_mask = self.inputs_of(encoder_output(outputs, k, "itm"), k)
        self._check_width(q, q_tok)
        self._check_width(k, k_tok)
        q_emb, k_emb = embedding_of(outputs, q, "itm").detach(), embedding_of(outputs, k, "itm").detach()
        valid = present(batch, q, q_emb) & present(batch, k, k_emb)
        b = q_tok.shape[0]
        rank, world = loss_world(self.gather == "local")
        keys = identity_keys(batch, (q, k), self._source_key(batch), rank * b, b).to(q_tok.device)
        if world > 1:
            q_all, qm_all = _gather_tokens(q_tok, q_mask, world)
            k_all, km_all = _gather_tokens(k_tok, k_mask, world)
            q_emb_all, k_emb_all = _gather_plain(q_emb, world), _gather_plain(k_emb, world)
            valid_all, keys_all = gather_mask(valid, world), _gather_plain(keys, world)
        else:
            q_all, qm_all, k_all, km_all = q_tok, q_mask, k_tok, k_mask
            q_emb_all, k_emb_all, valid_all, keys_all = q_emb, k_emb, valid, keys
        forbidden = same_item(keys, keys_all) | ~valid_all[None, :]
        sim_qk, sim_kq = q_emb.float() @ k_emb_all.float().T, k_emb.float() @ q_emb_all.float().T
        scale = self.negative_scale()
        neg_k, ok_k = sample_negatives(scale * sim_qk, forbidden)
        neg_q, ok_q = sample_negatives(scale * sim_kq, forbidden)
        weights = torch.cat([valid, valid & ok_k, valid & ok_q]).float()
        loss, logits, labels = itm_loss(self.fusions[f"{q}__{k}"], q_tok, q_mask, k_tok, k_mask, q_all, qm_all,
                                        k_all, km_all, neg_k, neg_q, weights, self.balance)
        with torch.no_grad():
            hits = (logits.argmax(1) == labels).float() * weights
            pos, neg = weights[:b], weights[b:]
            rows = torch.arange(b, device=sim_qk.device)
            chosen = torch.cat([sim_qk[rows, neg_k][ok_k & valid], sim_kq[rows, neg_q][ok_q & valid]])
            metrics = {
                "acc": hits.sum() / weights.sum().clamp(min=1),
                "pos_acc": hits[:b].sum() / pos.sum().clamp(min=1),
                "neg_acc": hits[b:].sum() / neg.sum().clamp(min=1),
                # rows of present samples that had no valid negative (all candidates the same item)
                "no_negative": (valid & ~ok_k).sum().float() + (valid & ~ok_q).sum().float(),
                "negative_sim": chosen.mean() if chosen.numel() else sim_qk.new_zeros(()),
                "negative_scale": sim_qk.new_tensor(scale),
            }
        return loss, metrics

    def negative_scale(self) -> float:
        """The similarity scale negatives are drawn with at this step (0: uniform)."""
        if self.negatives == "random":
            return 0.0
        ramp = 1.0 if not self.hard_warmup else min(1.0, max(int(self.step) - 1, 0) / self.hard_warmup)
        return self.negative_logit_scale * ramp

    def inputs_of(self, out: EncoderOutput, modality: str = "") -> tuple[Tensor, Tensor]:
        """The (tokens, bool mask) the fusion reads from an encoder output (``features`` picks which)."""
        if self.features == "tokens":
            return _with_mask(out.tokens, out.mask)
        emb = out.get("token_embedding")
        if emb is None:
            raise ValueError(f"itm: encoder output of {modality!r} has no token_embedding; encode it with "
                             f"MultimodalModel(..., tokens=({modality!r},)) (Pretrainer does so from token_modalities)")
        return _with_mask(emb, out.mask)

    def project(self, model: nn.Module, modality: str, tokens: Tensor) -> Tensor:
        """A tower's raw tokens as the fusion reads them, for callers that hold raw tokens (eval re-ranking):
        the model's head and L2 normalisation, as ``MultimodalModel.encode_fields(tokens=True)`` does."""
        if self.features == "tokens":
            return tokens
        return F.normalize(model.heads[modality](tokens).float(), dim=-1)

    def _check_width(self, modality: str, tokens: Tensor) -> None:
        if tokens.shape[-1] != self.widths[modality]:
            raise ConfigError(f"itm.widths.{modality}: {self.widths[modality]}, but the '{modality}' {self.features} "
                              f"are {tokens.shape[-1]} wide")

    def _source_key(self, batch: Batch | None) -> str | None:
        if self.source_key and not (batch is not None and batch.meta.get("json")) and not self._warned_source:
            warnings.warn(f"itm.source_key: {self.source_key!r} set, but the batch carries no json (the training "
                          "loader keeps none): negatives exclude same-sample, same-input and same-caption pairs only",
                          stacklevel=3)
            self._warned_source = True
        return self.source_key

    def fusion_for(self, a: str, b: str) -> tuple[str, str]:
        """The (query, key) order of the trained pair of modalities ``a`` and ``b``."""
        for q, k in self.pairs:
            if {q, k} == {a, b}:
                return q, k
        raise ConfigError(f"itm: no pair of '{a}' and '{b}' (pairs: {[list(p) for p in self.pairs]})")

    def match_logit(self, inputs: dict[str, tuple[Tensor, Tensor | None]]) -> Tensor:
        """Matched-vs-unmatched log-odds (N,) of N paired rows of two modalities' tokens:
        ``{modality: (tokens (N, T, D), mask (N, T) or None)}`` (the re-ranking score)."""
        if len(inputs) != 2:
            raise ValueError(f"itm.match_logit: expected two modalities, got {list(inputs)}")
        q, k = self.fusion_for(*inputs)
        (qt, qm), (kt, km) = (_with_mask(*inputs[q]), _with_mask(*inputs[k]))
        logits = self.fusions[f"{q}__{k}"](qt, qm, kt, km)
        return logits[:, 1] - logits[:, 0]



def _with_mask(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return tokens, mask.to(torch.bool)


@full_precision
def momentum_itc_loss(a: Tensor, b: Tensor, a_m: Tensor, b_m: Tensor, queue_a: Tensor, queue_b: Tensor,
                      scale: Tensor, alpha: float, valid: Tensor | None = None,
                      queue_forbidden: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """ALBEF's contrastive loss with momentum distillation, both directions averaged.

    a, b (B, E): online embeddings (the in-batch columns, with gradient, as in ``clip``); a_m, b_m (B, E):
    the momentum towers' embeddings; queue_a, queue_b (Q, E): earlier momentum embeddings, extra columns.
    Row i of a->b is scored against [b; queue_b]; its target is (1 - alpha) * one-hot(i) + alpha *
    softmax(scale * a_m_i @ [b_m; queue_b]). valid (B,) bool: absent samples leave the rows and columns.
    queue_forbidden (B, Q) bool: queue entries that leave row i's softmax and target (the same item
    as sample i, so not a negative of it; queue_a[j] and queue_b[j] are one earlier sample).
    With alpha 0 and an empty queue this is ``clip_loss`` exactly.
    """
    valid = torch.ones(a.shape[0], dtype=torch.bool, device=a.device) if valid is None else valid.bool()
    scale = scale.float()
    losses, hits = [], []
    forbidden = queue_forbidden if queue_forbidden is not None else valid.new_zeros(len(a), len(queue_a))
    for x, y, x_m, y_m, queue in ((a, b, a_m, b_m, queue_b), (b, a, b_m, a_m, queue_a)):
        cols = torch.cat([valid[None].expand(len(x), -1), ~forbidden], 1)
        # a finite fill (not -inf): a row whose columns are all absent stays free of NaN (see clip)
        fill = torch.finfo(torch.float32).min
        logits = (scale * x.float() @ torch.cat([y.float(), queue.float()]).T).masked_fill(~cols, fill)
        with torch.no_grad():
            soft = scale * x_m.float() @ torch.cat([y_m.float(), queue.float()]).T
            soft = torch.softmax(soft.masked_fill(~cols, fill), 1)
            hard = torch.eye(*logits.shape, device=logits.device)
            target = (1 - alpha) * hard + alpha * soft
            hits.append(((logits.argmax(1) == torch.arange(len(x), device=x.device)).float() * valid).sum())
        # masked columns have target 0: zero their log-probabilities (-inf after the fill) before the product
        log_p = torch.log_softmax(logits, 1).masked_fill(~cols, 0.0)
        losses.append(-(target * log_p).sum(1)[valid].sum())
    count = valid.sum().clamp(min=1)
    loss = (losses[0] + losses[1]) / (2 * count) if valid.any() else 0.0 * (a.sum() + b.sum())
    return loss, {"acc": hits[0] / count, "acc_ba": hits[1] / count}


def frozen_copy(module: nn.Module) -> nn.Module:
    """An fp32 deep copy of ``module`` in eval mode whose parameters take no gradient."""
    return copy.deepcopy(module).float().requires_grad_(False).eval()


def _momentum_embedding(tower: nn.Module, head: nn.Module, fields: dict[str, Tensor]) -> Tensor:
    """L2-normalised projected pooled embedding, as ``MultimodalModel.encode_fields`` computes it."""
    return F.normalize(head(tower(fields).pooled).float(), dim=-1)


@objectives.register("itc_momentum")
class MomentumITC(Objective):
    """ALBEF's contrastive loss with momentum distillation and a feature queue (off unless a recipe names it).

    Momentum copies (fp32, no gradient) of the paired towers and heads are made from the model at the
    first forward and after that move by EMA at every training forward, before they encode the batch
    (ALBEF's order). Their embeddings give soft targets; a FIFO queue of them (gathered from all ranks,
    so every rank's queue is the same) adds columns. The copies are held outside the module tree (the
    optimizer and DeepSpeed, which lists a module's parameters once, when the engine is built, never
    see them) but their state is in this objective's state_dict (``momentum.*``), as the queue's is
    (buffers): checkpoints carry both and a resumed run goes on exactly. The in-batch columns are the online embeddings (gradient to both towers, as ``clip``), so
    alpha 0 and queue_size 0 is ``clip``. ZeRO-3 is refused: a copy of partitioned parameters is wrong.

    pairs: modality pairs to contrast, e.g. [[image, text]]. momentum: EMA factor of the momentum
    towers (ALBEF 0.995). alpha: weight of the momentum soft targets against the one-hot targets (ALBEF
    0.4). queue_size: momentum embeddings kept per modality as extra columns (0: none; ALBEF 65536).
    init_logit_scale: starting scale (1/temperature). max_logit_scale: upper bound of the scale.
    learn_logit_scale: train the scale (else fixed at init).
    """

    uses_model = True
    tiny_configs = ({"pairs": [["image", "text"]], "queue_size": 8, "init_logit_scale": 20.0},)

    def __init__(self, *, pairs: list[list[str]], momentum: float = 0.995, alpha: float = 0.4,
                 queue_size: int = 0, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True):
        super().__init__()
        self.pairs = check_pairs(pairs, "itc_momentum")
        self.modalities = tuple(dict.fromkeys(m for p in self.pairs for m in p))
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"itc_momentum.momentum: expected 0 <= momentum < 1, got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"itc_momentum.alpha: expected 0 <= alpha <= 1, got {alpha}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ConfigError(f"itc_momentum.queue_size: expected an integer >= 0, got {queue_size!r}")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"itc_momentum.init_logit_scale: expected 0 < init_logit_scale <= max_logit_scale "
                              f"({max_logit_scale}), got {init_logit_scale}")
        self.momentum, self.alpha, self.queue_size = float(momentum), float(alpha), queue_size
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full((len(self.pairs),), math.log(init_logit_scale)),
                                        requires_grad=learn_logit_scale)
        # Per modality: its momentum tower and head, and its queue (Q, embed_dim), all made at the first
        # forward (the width is the model's); a checkpoint loaded before that is held until then.
        # Per modality {towers, heads}: its momentum tower and head, and its queue buffer (Q, embed_dim),
        # all made at the first forward (their sizes are the model's); state loaded before is held till then.
        object.__setattr__(self, "copies", nn.ModuleDict({"towers": nn.ModuleDict(), "heads": nn.ModuleDict()}))
        self.register_buffer("fifo_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("fifo_filled", torch.zeros(1, dtype=torch.long))
        self._pending: dict[str, Tensor] = {}
        self._register_state_dict_hook(_save_copies)
        self._register_load_state_dict_pre_hook(self._load_lazy_state)

    @property
    def built(self) -> bool:
        """Whether the momentum copies exist (after the first forward)."""
        return len(self.copies["towers"]) > 0

    def _load_lazy_state(self, state_dict: dict, prefix: str, *args: object) -> None:
        copies = {k[len(prefix) + len("momentum."):]: state_dict.pop(k)
                  for k in [k for k in state_dict if k.startswith(prefix + "momentum.")]}
        if self.built:
            self.copies.load_state_dict(copies)
            return
        queues = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix + "queue_")]}
        self._pending = {"copies": copies, "queues": queues} if copies else {}

    def queue(self, modality: str) -> Tensor:
        """The filled part of ``modality``'s queue (N <= queue_size, embed_dim), in storage order."""
        return getattr(self, f"queue_{modality}")[: int(self.fifo_filled)]

    def queue_forbidden(self, fingerprints: dict[str, Tensor]) -> Tensor:
        """(B, N) bool: queue entries with an input equal to sample i's (a duplicate caption or image is
        the same item, not a negative: on data with few distinct captions most of the queue would be)."""
        n = int(self.fifo_filled)
        out = torch.zeros(next(iter(fingerprints.values())).shape[0], n, dtype=torch.bool, device=self.fifo_ptr.device)
        for m, fp in fingerprints.items():
            out |= same_item(fp[:, None].to(out.device), getattr(self, f"queue_ids_{m}")[:n, None])
        return out

    @torch.no_grad()
    def _build(self, model: nn.Module) -> bool:
        """Make the momentum copies and queues; True when a held checkpoint state was loaded into them."""
        if any(hasattr(p, "ds_status") for p in model.parameters()):
            raise ConfigError("itc_momentum: momentum towers need train.zero_stage <= 2 (a copy of ZeRO-3 "
                              "partitioned parameters is wrong); got zero_stage 3")
        for m in self.modalities:
            if m not in model.encoders:
                raise ConfigError(f"itc_momentum.pairs: no encoder for modality {m!r} "
                                  f"(have {', '.join(model.encoders)})")
            self.copies["towers"][m] = frozen_copy(model.encoders[m])
            self.copies["heads"][m] = frozen_copy(model.heads[m])
            self.register_buffer(f"queue_{m}", torch.zeros(self.queue_size, model.embed_dim,
                                                           device=self.logit_scale.device))
            # each entry's input fingerprint (see input_fingerprints)
            self.register_buffer(f"queue_ids_{m}", torch.zeros(self.queue_size, 2, dtype=torch.long,
                                                               device=self.logit_scale.device))
        restored, self._pending = self._pending, {}
        if restored:
            self.copies.load_state_dict(restored["copies"])
            for name, q in restored["queues"].items():
                getattr(self, name).copy_(q)
        return bool(restored)

    @torch.no_grad()
    def ema_update(self, model: nn.Module) -> None:
        """momentum_param <- momentum * momentum_param + (1 - momentum) * online_param; buffers copied."""
        for m in self.modalities:
            for mom, online in ((self.copies["towers"][m], model.encoders[m]), (self.copies["heads"][m], model.heads[m])):
                for p_m, p in zip(mom.parameters(), online.parameters(), strict=True):
                    p_m.mul_(self.momentum).add_(p.detach().float(), alpha=1 - self.momentum)
                for b_m, b in zip(mom.buffers(), online.buffers(), strict=True):
                    b_m.copy_(b)

    @torch.no_grad()
    def _momentum_embeddings(self, batch: Batch) -> dict[str, Tensor]:
        out = {}
        for m in self.modalities:
            # eval mode (frozen_copy): no dropout in the targets; batch norm uses the online running statistics
            out[m] = _momentum_embedding(self.copies["towers"][m], self.copies["heads"][m], batch.fields[m])
        return out

    @torch.no_grad()
    def _enqueue(self, emb: dict[str, Tensor], fingerprints: dict[str, Tensor], valid: Tensor) -> None:
        if not self.queue_size:
            return
        _, world = loss_world()
        fingerprints = {m: f.to(self.fifo_ptr.device) for m, f in fingerprints.items()}
        if world > 1:
            emb = {m: _gather_plain(e, world) for m, e in emb.items()}
            fingerprints = {m: _gather_plain(f, world) for m, f in fingerprints.items()}
            valid = gather_mask(valid, world)
        keep = valid.to(self.fifo_ptr.device)
        kept = int(keep.sum())
        n = min(kept, self.queue_size)  # a batch larger than the queue leaves its newest rows
        slots = (self.fifo_ptr + torch.arange(n, device=self.fifo_ptr.device)) % self.queue_size
        for m in emb:
            getattr(self, f"queue_{m}")[slots] = emb[m].to(keep.device)[keep][kept - n:]
            getattr(self, f"queue_ids_{m}")[slots] = fingerprints[m][keep][kept - n:]
        self.fifo_ptr.copy_((self.fifo_ptr + n) % self.queue_size)
        self.fifo_filled.clamp_(max=self.queue_size - n).add_(n)

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch, model: nn.Module) -> ObjectiveOutput:
        """Mean over pairs of the distilled contrastive loss; then the batch's momentum embeddings join the queue."""
        # a fresh copy equals the online towers; a restored one (resumed run) moves on as it would have
        copied = not self.built and not self._build(model)
        if self.training and not copied:
            self.ema_update(model)
        emb_m = self._momentum_embeddings(batch)
        fingerprints = {m: input_fingerprints(batch.fields[m]) for m in self.modalities}
        scales = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        losses, metrics = [], {}
        every = None
        for i, (a, b) in enumerate(self.pairs):
            ea, eb = embedding_of(outputs, a, "itc_momentum"), embedding_of(outputs, b, "itc_momentum")
            valid = present(batch, a, ea) & present(batch, b, eb)
            every = valid if every is None else every & valid
            forbidden = self.queue_forbidden({a: fingerprints[a], b: fingerprints[b]})
            loss, m = momentum_itc_loss(ea, eb, emb_m[a], emb_m[b], self.queue(a), self.queue(b), scales[i],
                                        self.alpha, valid, forbidden)
            losses.append(loss)
            metrics.update({f"{a}_{b}/acc": m["acc"], f"{b}_{a}/acc": m["acc_ba"],
                            f"{a}_{b}/logit_scale": scales[i].detach()})
        metrics["queue_filled"] = self.fifo_filled[0].float()
        if self.training:
            self._enqueue(emb_m, fingerprints, every)
        return ObjectiveOutput(loss=torch.stack(losses).mean(), metrics=metrics)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the logit scales."""
        return {"logit_scale"}


def _save_copies(module: MomentumITC, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the momentum copies' state under ``momentum.`` (they are not submodules)."""
    state_dict.update({f"{prefix}momentum.{k}": v for k, v in module.copies.state_dict(keep_vars=False).items()})
