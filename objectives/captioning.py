"""Captioning objectives: ``caption`` (a text decoder cross-attending to any encoder's tokens) and ``coca``
(CLIP plus a caption loss from multimodal layers on the text tower's own tokens: one text forward for both).

Both train with teacher forcing: position t predicts token t + 1 of the batch's text ids, padding and
samples lacking either modality ignored. Both also decode: :meth:`CaptionObjective.start_decoding`
encodes the source once and returns a :class:`mmpt.nn.generate.Decoder` that greedy, beam or sampled
generation steps with a KV cache (``mmpt caption``, the ``caption`` eval task).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.layers import Block, CrossBlock, KVCache, init_weights
from mmpt.objectives.contrastive import (
    GatherMode,
    bounded_log_scale,
    clip_loss,
    embedding_of,
    encoder_output,
    present,
)
from mmpt.registry import ConfigError, objectives


def caption_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) target ids: the positions that count (padding and
    absent samples already left out); fp32. With N = 0: a zero that keeps the graph."""
    if not logits.shape[0]:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def coca_loss(a: Tensor, b: Tensor, logits: Tensor, targets: Tensor, logit_scale: Tensor, *,
              clip_weight: float, caption_weight: float, gather: GatherMode, label_smoothing: float = 0.0,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """CoCa's loss: ``clip_weight`` x CLIP(a, b) + ``caption_weight`` x caption cross-entropy of the counted
    positions' (N, V) logits (open_clip's ``CoCaLoss`` with padding left out by a mask, not by an id, so a
    tokenizer whose padding id is a real token is safe); returns (clip term, caption term, metrics)."""
    clip, metrics = clip_loss(a, b, logit_scale, gather=gather, valid=valid)
    return clip_weight * clip, caption_weight * caption_loss(logits, targets, label_smoothing), metrics


class CaptionDecoder(nn.Module):
    """Causal text decoder over a memory: ``depth`` x (causal self-attention block, cross-attention block),
    LayerNorm, a vocabulary head. With ``embed`` it embeds token ids (own token and position embeddings,
    the ``caption`` decoder); without, it continues features of a text tower (CoCa's multimodal layers)."""

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, memory_width: int,
                 mlp_ratio: float = 4.0, context_length: int | None = None):
        super().__init__()
        self.context_length = context_length
        if context_length is not None:
            self.token_embed = nn.Embedding(vocab_size, width)
            self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.cross = nn.ModuleList(CrossBlock(width, heads, memory_width, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(init_weights)
        if context_length is not None:
            nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """(B, T) ids (or (B, T, width) features) -> (B, T, vocab) next-token logits, or (N, vocab) for the
        N positions where ``positions`` (B, T) is True: the vocabulary head is most of a step's work, and
        padding needs none. With ``cache`` only the positions after ``cache.length`` are given and the
        memory may be None after the first step."""
        if self.context_length is not None:
            start = 0 if cache is None else cache.length
            if start + x.shape[1] > self.context_length:
                raise ValueError(f"caption decoder: {start + x.shape[1]} positions > context_length "
                                 f"{self.context_length}")
            x = self.token_embed(x) + self.pos_embed[:, start:start + x.shape[1]]
        for block, cross in zip(self.blocks, self.cross, strict=True):
            x = cross(block(x, None, cache), memory, memory_mask, cache)
        x = self.norm(x)
        return self.head(x if positions is None else x[positions])


class CaptionObjective(Objective):
    """What ``caption`` and ``coca`` share: reading the batch's text, the teacher-forced targets, checks
    against the towers, and :meth:`start_decoding`."""

    source: str
    text: str
    decoder: CaptionDecoder
    memory_width: int
    registry_name: str  # set by the registry

    def targets(self, batch: Batch, outputs: dict[str, EncoderOutput], like: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T-1) next-token ids and the bool mask of positions that count (real, both modalities present)."""
        fields = batch.fields.get(self.text)
        if fields is None or "ids" not in fields:
            raise ConfigError(f"{self.registry_name}.text: the batch has no token ids for modality {self.text!r} "
                              f"(have {', '.join(batch.fields) or 'none'})")
        ids, mask = fields["ids"].to(like.device), fields["mask"].to(like.device)
        both = present(batch, self.text, ids) & present(batch, self.source, ids)
        return ids[:, 1:], mask[:, 1:] & both[:, None]

    def memory(self, outputs: dict[str, EncoderOutput]) -> tuple[Tensor, Tensor | None]:
        """The source tower's tokens (B, S, D) and mask, checked against ``memory_width``."""
        out = encoder_output(outputs, self.source, self.registry_name)
        if out.tokens.shape[-1] != self.memory_width:
            raise ConfigError(f"{self.registry_name}.memory_width: {self.memory_width}, but the {self.source!r} "
                              f"tower's tokens are {out.tokens.shape[-1]} wide; set memory_width: {out.tokens.shape[-1]}")
        return out.tokens, out.mask

    def step_logits(self, model: nn.Module, ids: Tensor, memory: Tensor | None, memory_mask: Tensor | None,
                    cache: KVCache | None) -> Tensor:  # pragma: no cover - abstract
        """(N, V) logits of the token after ``ids`` (N, t), decoded against ``memory``."""
        raise NotImplementedError

    @torch.no_grad()
    def start_decoding(self, model: nn.Module, fields: dict[str, Tensor]) -> SourceDecoder:
        """Encode the source (collated ``fields`` of ``self.source``) once; returns the decoder generation
        steps (:mod:`mmpt.nn.generate`). ``model``: the :class:`~mmpt.model.MultimodalModel`."""
        if self.source not in model.encoders:
            raise ConfigError(f"{self.registry_name}.source: the model has no {self.source!r} tower")
        tokenizer = getattr(model.data.get(self.text), "tokenizer", None)
        if tokenizer is None or tokenizer.eos_id is None or tokenizer.bos_id is None:
            raise ConfigError(f"{self.registry_name}.text: modality {self.text!r} has no tokenizer with bos/eos ids")
        if tokenizer.vocab_size > self.decoder.head.out_features:
            raise ConfigError(f"{self.registry_name}.tokenizer: the {self.text!r} tokenizer has {tokenizer.vocab_size} "
                              f"ids, the decoder predicts {self.decoder.head.out_features}")
        out = model.encoders[self.source](fields)
        memory, memory_mask = self.memory({self.source: out})
        return SourceDecoder(self, model, memory, memory_mask, tokenizer)


class SourceDecoder:
    """One batch's decoding state for :mod:`mmpt.nn.generate`: the source tokens, encoded once, and the step."""

    def __init__(self, objective: CaptionObjective, model: nn.Module, memory: Tensor, memory_mask: Tensor | None,
                 tokenizer: Any):
        self.objective, self.model, self.memory, self.memory_mask = objective, model, memory, memory_mask
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.batch_size, self.device = memory.shape[0], memory.device
        self.max_positions = objective.max_positions(model)

    def step(self, ids: Tensor, rows: Tensor, cache: KVCache | None) -> Tensor:
        """(N, V) next-token logits after ``ids`` (N, t) for rows continuing samples ``rows`` (N,); with a
        cache, ``ids`` are the positions it has not seen and the memory goes in only on the first step."""
        first = cache is None or cache.length == 0
        memory = self.memory.index_select(0, rows) if first else None
        mask = self.memory_mask.index_select(0, rows) if first and self.memory_mask is not None else None
        return self.objective.step_logits(self.model, ids, memory, mask, cache).float()


def _tokenizer_vocab(tokenizer: str, context_length: int) -> int:
    from mmpt.nn.tokenizers import build_tokenizer

    return build_tokenizer(tokenizer, context_length).vocab_size


@objectives.register("caption")
class Caption(CaptionObjective):
    """Autoregressive captioning: a text decoder (own embeddings) cross-attends to the ``source`` tower's
    tokens and predicts the ``text`` modality's ids, teacher-forced, with label smoothing.

    source: modality whose tokens the decoder reads (any encoder). text: token modality whose ids are the
    targets. tokenizer: that modality's tokenizer ('openclip-bpe' or 'hf:<folder>'; sets the vocabulary).
    context_length: the text's token count (the decoder's positions). width: decoder width. depth: decoder
    layers (each self- and cross-attention). heads: attention heads. mlp_ratio: MLP hidden size over width.
    memory_width: width of the source tower's tokens. label_smoothing: cross-entropy label smoothing.
    """

    tiny_configs = ({"tokenizer": "openclip-bpe", "context_length": 16, "width": 32, "depth": 1, "heads": 2,
                     "memory_width": 32},)

    def __init__(self, *, source: str = "image", text: str = "text", tokenizer: str = "openclip-bpe",
                 context_length: int = 77, width: int = 256, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0,
                 memory_width: int = 256, label_smoothing: float = 0.1):
        super().__init__()
        if source == text:
            raise ConfigError(f"caption: source and text are both {source!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"caption.label_smoothing: expected 0 <= value < 1, got {label_smoothing}")
        self.source, self.text, self.memory_width = source, text, memory_width
        self.label_smoothing = label_smoothing
        self.modalities = (source,)
        self.decoder = CaptionDecoder(_tokenizer_vocab(tokenizer, context_length), width, depth, heads, memory_width,
                                      mlp_ratio, context_length=context_length)

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """Teacher-forced caption cross-entropy plus token accuracy."""
        memory, memory_mask = self.memory(outputs)
        targets, mask = self.targets(batch, outputs, memory)
        ids = batch.fields[self.text]["ids"].to(memory.device)[:, :-1]
        logits = self.decoder(ids, memory, memory_mask, positions=mask)
        loss = caption_loss(logits, targets[mask], self.label_smoothing)
        return ObjectiveOutput(loss=loss, metrics=token_metrics(logits, targets[mask]))

    def step_logits(self, model: nn.Module, ids: Tensor, memory: Tensor | None, memory_mask: Tensor | None,
                    cache: KVCache | None) -> Tensor:
        return self.decoder(ids, memory, memory_mask, cache, positions=last_position(ids))

    def max_positions(self, model: nn.Module) -> int:
        """Tokens a generated caption may hold, BOS included."""
        return int(self.decoder.context_length)

    def no_weight_decay(self) -> set[str]:
        """Embeddings are not decayed (as the text tower's)."""
        return {"decoder.pos_embed", "decoder.token_embed.weight"}


@objectives.register("coca")
class CoCa(CaptionObjective):
    """CoCa: the ``text`` tower (causal, EOT pooling) gives the contrastive embedding, and its tokens from the
    same forward feed multimodal layers (causal self-attention + cross-attention to the ``source`` tower's
    tokens) that predict the next token. Loss = clip_weight x CLIP + caption_weight x caption (open_clip's
    ``CoCaLoss``; its defaults are 1 and 2).

    source: modality the captions describe (any encoder). text: the causal text tower's modality.
    tokenizer: that tower's tokenizer (sets the vocabulary). width: the text tower's width. depth:
    multimodal layers. heads: attention heads. mlp_ratio: MLP hidden size over width. memory_width: width of
    the source tower's tokens. clip_weight: weight of the contrastive term. caption_weight: weight of the
    caption term. label_smoothing: caption label smoothing (CoCaLoss: 0). gather: how features cross ranks
    ('local', 'no_grad', 'with_grad'). local_loss: each rank's rows against all columns. init_logit_scale:
    starting scale (1/temperature). max_logit_scale: upper bound of the scale.
    """

    tiny_configs = ({"tokenizer": "openclip-bpe", "width": 32, "depth": 1, "heads": 2, "memory_width": 32},)

    def __init__(self, *, source: str = "image", text: str = "text", tokenizer: str = "openclip-bpe",
                 width: int = 512, depth: int = 2, heads: int = 8, mlp_ratio: float = 4.0, memory_width: int = 512,
                 clip_weight: float = 1.0, caption_weight: float = 2.0, label_smoothing: float = 0.0,
                 gather: str = "no_grad", local_loss: bool = False, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0):
        super().__init__()
        if source == text:
            raise ConfigError(f"coca: source and text are both {source!r}")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ConfigError(f"coca.init_logit_scale: expected 0 < value <= max_logit_scale ({max_logit_scale}), "
                              f"got {init_logit_scale}")
        self.source, self.text, self.memory_width, self.width = source, text, memory_width, width
        self.clip_weight, self.caption_weight = float(clip_weight), float(caption_weight)
        self.label_smoothing = label_smoothing
        self.gather = GatherMode.parse(gather, local_loss)
        self.max_logit_scale = float(max_logit_scale)
        self.modalities = (source, text)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)))
        # the vocabulary does not depend on the context length
        self.decoder = CaptionDecoder(_tokenizer_vocab(tokenizer, 77), width, depth, heads, memory_width, mlp_ratio)

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch) -> ObjectiveOutput:
        """clip_weight x CLIP + caption_weight x caption cross-entropy on the text tower's own tokens."""
        text_out = encoder_output(outputs, self.text, "coca")
        if text_out.tokens.shape[-1] != self.width:
            raise ConfigError(f"coca.width: {self.width}, but the {self.text!r} tower is {text_out.tokens.shape[-1]} "
                              f"wide; set width: {text_out.tokens.shape[-1]}")
        memory, memory_mask = self.memory(outputs)
        targets, mask = self.targets(batch, outputs, memory)
        logits = self.decoder(text_out.tokens[:, :-1], memory, memory_mask, positions=mask)
        a, b = embedding_of(outputs, self.source, "coca"), embedding_of(outputs, self.text, "coca")
        valid = present(batch, self.source, a) & present(batch, self.text, b)
        scale = bounded_log_scale(self.logit_scale.float(), math.log(self.max_logit_scale)).exp()
        clip, caption, m = coca_loss(a, b, logits, targets[mask], scale[0], clip_weight=self.clip_weight,
                                     caption_weight=self.caption_weight, gather=self.gather,
                                     label_smoothing=self.label_smoothing, valid=valid)
        metrics = {"clip_loss": clip.detach(), "caption_loss": caption.detach(), f"{self.source}_{self.text}/acc": m["acc"],
                   f"{self.text}_{self.source}/acc": m["acc_ba"], "logit_scale": scale[0].detach()}
        metrics.update(token_metrics(logits, targets[mask]))
        return ObjectiveOutput(loss=clip + caption, metrics=metrics)

    def step_logits(self, model: nn.Module, ids: Tensor, memory: Tensor | None, memory_mask: Tensor | None,
                    cache: KVCache | None) -> Tensor:
        fields = {"ids": ids, "mask": torch.ones_like(ids, dtype=torch.bool)}
        tokens = model.encoders[self.text](fields, cache=cache).tokens
        return self.decoder(tokens, memory, memory_mask, cache, positions=last_position(ids))

    def max_positions(self, model: nn.Module) -> int:
        """Tokens a generated caption may hold, BOS included: the text tower's context."""
        return int(model.encoders[self.text].context_length)

    def no_weight_decay(self) -> set[str]:
        """The logit scale is not decayed."""
        return {"logit_scale"}


def last_position(ids: Tensor) -> Tensor:
    """(N, t) bool, True at the last position: decoding needs the vocabulary head there only."""
    last = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    last[:, -1] = True
    return last


def token_metrics(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Next-token top-1 accuracy of (N, V) logits over the N positions that count (detached)."""
    with torch.no_grad():
        return {"token_acc": (logits.argmax(-1) == targets).float().sum() / max(len(targets), 1)}
