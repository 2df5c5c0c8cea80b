"""Masked modelling, one family: ``mlm`` for token modalities (text, protein) and ``masked_tokens`` for
continuous ones (image patches, spectrogram patches, point groups).

``mlm`` (BERT / ESM-2 masked language modelling). Masking is one vectorised draw on the batch from torch's
global RNG (a resumed run restores that RNG, so the masks repeat). Real, non-special tokens are selectable;
they are grouped into units (tokens, or whole words from the tokenizer's ``word_ids``), units into spans of
geometric length, and each span is selected with probability ``rate``. A selected token becomes the mask
token, a random non-special token or stays (80/10/10 by default). The tower encodes the corrupted ids
through its own ``forward`` and a BERT-style head (dense, GELU, LayerNorm, decoder tied to the tower's input
embedding) predicts the original ids at the selected positions only.

``masked_tokens`` (MAE, Audio-MAE, Point-MAE). The objective draws which patch tokens stay visible (one
``argsort`` of uniform noise for the batch), runs the tower's own ``forward`` with a ``keep`` field (a
module call, so ZeRO-3 gathers the tower's parameters), and gets back the visible tokens after the trunk
plus, in ``extras``, every patch's target, coordinates and padding mask. A light transformer decoder puts a
mask token at each dropped patch, adds positions made from the coordinates the encoder gives (grid cell
centres, point-group centres), and predicts every patch's target; the encoder supplies the distance
(``reconstruction_loss``: normalised-pixel MSE, spectrogram-patch MSE, L2 Chamfer). The loss is the mean
over dropped real patches of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import Batch, EncoderOutput, Objective, ObjectiveOutput
from mmpt.nn.layers import Transformer, init_weights, layer_exit
from mmpt.nn.matryoshka import NESTING_KEYS_DOC, Exit, NestedLayerNorm, NestedLinear, Nesting, nested_losses
from mmpt.nn.token_encoder import PrefixTokenEncoder, keep_count, random_keep
from mmpt.registry import ConfigError, closest, objectives

SCHEDULES = ("constant", "linear", "cosine")


def scheduled_rate(step: int, rate: float, rate_start: float, schedule: str, steps: int) -> float:
    """The masking rate after ``step`` training forwards: ``rate_start`` moving to ``rate`` over ``steps``
    (linearly or on a half cosine), then ``rate``; a constant schedule is ``rate`` throughout."""
    if schedule == "constant" or step >= steps:
        return rate
    frac = step / steps
    if schedule == "linear":
        return rate_start + (rate - rate_start) * frac
    return rate + (rate_start - rate) * 0.5 * (1 + math.cos(math.pi * frac))


def token_units(selectable: Tensor, word_ids: Tensor | None = None) -> Tensor:
    """(B, L) index of the masking unit of each token, -1 where a token cannot be selected: its position
    among the row's selectable tokens, or its word (``word_ids``) for whole-word masking."""
    units = selectable.long().cumsum(1) - 1 if word_ids is None else word_ids.long()
    return torch.where(selectable, units, torch.full_like(units, -1))


def draw_selection(units: Tensor, rate: float, span_mean: float = 1.0) -> Tensor:
    """(B, L) bool: tokens whose unit lies in a selected span. Each unit starts a new span with probability
    1 / ``span_mean`` (so span lengths are geometric with that mean) and each span is selected with
    probability ``rate``: every selectable token is selected with probability ``rate``. Two uniform draws of
    shape (B, L) whatever the inputs hold, so the RNG advances the same on every batch."""
    b, n = units.shape
    starts = torch.rand(b, n, device=units.device) < 1.0 / span_mean
    starts[:, 0] = True
    span_of_unit = starts.long().cumsum(1) - 1  # unit indices are < L, so (B, L) covers every unit
    span_selected = torch.rand(b, n, device=units.device) < rate
    unit_selected = span_selected.gather(1, span_of_unit)
    return (units >= 0) & unit_selected.gather(1, units.clamp_min(0))


def corrupt(ids: Tensor, selected: Tensor, mask_id: int, replace_ids: Tensor, mask_prob: float = 0.8,
            random_prob: float = 0.1) -> Tensor:
    """Selected tokens become ``mask_id`` (``mask_prob``), a uniform draw from ``replace_ids``
    (``random_prob``) or stay; unselected tokens stay."""
    action = torch.rand(ids.shape, device=ids.device)
    random_ids = replace_ids.to(ids.device)[torch.randint(len(replace_ids), ids.shape, device=ids.device)]
    out = torch.where(selected & (action < mask_prob), torch.full_like(ids, mask_id), ids)
    swap = selected & (action >= mask_prob) & (action < mask_prob + random_prob)
    return torch.where(swap, random_ids, out)


def mlm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and top-1 accuracy of (N, V) logits at the N selected positions; with N = 0 the
    loss is a zero that still reaches every head parameter (every rank runs the same backward)."""
    n = max(targets.numel(), 1)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n
    acc = (logits.detach().argmax(-1) == targets).float().sum() / n
    return loss, acc


class MaskingPlan:
    """What a tokenizer allows: the ids never selected (specials, mask, unknown) and the ids a random
    replacement draws from (every other id except padding)."""

    def __init__(self, tokenizer: object):
        tok = tokenizer
        excluded = set(getattr(tok, "special_ids", ())) | {tok.mask_id}
        if getattr(tok, "unk_id", None) is not None:
            excluded.add(tok.unk_id)
        self.mask_id = int(tok.mask_id)
        self.excluded = torch.tensor(sorted(excluded), dtype=torch.long)
        self.replace_ids = torch.tensor([i for i in range(tok.vocab_size) if i not in excluded | {tok.pad_id}],
                                        dtype=torch.long)
        self.word_ids = getattr(tok, "word_ids", None)

    def selectable(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Real tokens that are not excluded."""
        return mask.bool() & ~torch.isin(ids, self.excluded.to(ids.device))


@objectives.register("mlm")
class MLM(Objective):
    """Masked language modelling on a token modality (text, protein): BERT's masking and head, ESM-2's recipe.

    The tower encodes the corrupted ids (its own ``forward``, so ZeRO-3 gathers it); the head is dense +
    GELU + LayerNorm, then a decoder tied to the tower's ``token_embed`` (registered with ZeRO-3 as an
    external parameter of this module) or, with ``tie: false``, a Linear of its own. Loss and ``acc``
    (masked top-1) are taken over selected tokens only; ``rate`` logs the current masking rate. The
    masking-rate schedule counts training forwards in the persistent buffer ``step`` (saved in checkpoints,
    so a resumed run continues the schedule); eval forwards use ``rate`` and do not count.

    modality: the token modality to mask (its data side's tokenizer supplies special, pad and mask ids).
    width: the tower's token width (the head's size; checked against the tower's tokens).
    rate: share of selectable tokens selected; with a schedule, the rate it ends at.
    schedule: masking-rate schedule over training forwards: 'constant', 'linear' or 'cosine'.
    rate_start: the rate a linear or cosine schedule starts from (e.g. 0.3 for 30% -> 15%).
    schedule_steps: training forwards (micro-batches) the schedule takes to reach ``rate``.
    mask_prob: share of selected tokens replaced by the mask token.
    random_prob: share of selected tokens replaced by a random non-special token (the rest stay).
    span_mean: mean length, in units, of geometric masking spans (1: single units, as BERT).
    whole_word: units are whole words (the tokenizer's ``word_ids``) instead of tokens.
    tie: tie the decoder to the tower's input embedding ``token_embed`` (else a Linear of its own).
    vocab_size: size of an untied decoder (required with ``tie: false``); tied, adds an output bias of that size.
    """

    uses_model = True
    modalities = ()  # reads no encoder output: it encodes its masked copy itself
    tiny_configs = ({"modality": "text", "width": 32},
                    {"modality": "text", "width": 32, "tie": False, "vocab_size": 49409})

    def __init__(self, *, modality: str, width: int, rate: float = 0.15, schedule: str = "constant",
                 rate_start: float | None = None, schedule_steps: int = 0, mask_prob: float = 0.8,
                 random_prob: float = 0.1, span_mean: float = 1.0, whole_word: bool = False, tie: bool = True,
                 vocab_size: int | None = None, matryoshka_dims: list[int] | None = None,
                 matryoshka_weights: list[float] | None = None, starbucks: list[list[int]] | None = None,
                 starbucks_sample: bool = False):
        super().__init__()
        self.nesting = Nesting("mlm", matryoshka_dims, matryoshka_weights, starbucks, starbucks_sample)
        self.nesting.check_dims(width, "mlm.width")
        _check_settings(rate, schedule, rate_start, schedule_steps, mask_prob, random_prob, span_mean)
        if not tie and not vocab_size:
            raise ConfigError("mlm.vocab_size: required with tie: false (the size of the decoder's output)")
        self.modality, self.width = modality, width
        self.rate, self.schedule, self.schedule_steps = rate, schedule, schedule_steps
        self.rate_start = rate if rate_start is None else rate_start
        self.mask_prob, self.random_prob, self.span_mean, self.whole_word = mask_prob, random_prob, span_mean, whole_word
        # Nested layers: on the hidden state's first d dims they use their first d rows/columns (Starbucks'
        # masked LM on sub-dims); on the full width they are plain Linear / LayerNorm (same keys and values).
        self.transform = nn.Sequential(NestedLinear(width, width, nested_out=True), nn.GELU(), NestedLayerNorm(width))
        self.decoder = None if tie else NestedLinear(width, vocab_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if tie and vocab_size else None
        self.apply(init_weights)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self._plans: dict[int, MaskingPlan] = {}
        if tie:
            self.register_forward_pre_hook(_register_tied_weight)

    def current_rate(self) -> float:
        """The masking rate of the next forward (``rate`` in eval mode)."""
        if not self.training:
            return self.rate
        return scheduled_rate(int(self.step), self.rate, self.rate_start, self.schedule, self.schedule_steps)

    def plan(self, model: nn.Module) -> MaskingPlan:
        """The tokenizer's masking plan, built once per tokenizer."""
        data = getattr(model, "data", {}).get(self.modality)
        tok = getattr(data, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"mlm.modality={self.modality!r}: the model has no tokenizer for it "
                              f"(encoded modalities: {', '.join(model.encoders)}); mlm needs a token modality")
        if id(tok) not in self._plans:
            self._plans[id(tok)] = MaskingPlan(tok)
        return self._plans[id(tok)]

    def mask_batch(self, fields: dict[str, Tensor], present: Tensor | None, plan: MaskingPlan,
                   rate: float) -> tuple[Tensor, Tensor]:
        """(corrupted ids, selected) for one batch of ``ids``/``mask`` fields; absent rows are never selected."""
        ids, mask = fields["ids"], fields["mask"]
        if present is not None:
            mask = mask & present.to(mask.device)[:, None]
        words = None
        if self.whole_word:
            if plan.word_ids is None:
                raise ConfigError(f"mlm.whole_word: the {self.modality} tokenizer has no word_ids")
            words = plan.word_ids(ids)
        selected = draw_selection(token_units(plan.selectable(ids, mask), words), rate, self.span_mean)
        return corrupt(ids, selected, plan.mask_id, plan.replace_ids, self.mask_prob, self.random_prob), selected

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch, model: nn.Module) -> ObjectiveOutput:
        if self.modality not in model.encoders or self.modality not in batch.fields:
            raise ConfigError(f"mlm.modality={self.modality!r}: not encoded by this model or missing from the "
                              f"batch (encoders: {', '.join(model.encoders)})")
        rate = self.current_rate()
        if self.training:
            self.step += 1
        fields = batch.fields[self.modality]
        masked, selected = self.mask_batch(fields, batch.present.get(self.modality), self.plan(model), rate)
        targets, hidden = fields["ids"][selected], {}

        def selected_tokens(layer: int | None) -> Tensor:
            # one tower run per layer (a module call), on the same masked ids
            if layer not in hidden:
                with layer_exit(model.encoders[self.modality], layer, "mlm.starbucks"):
                    tokens = model.encoders[self.modality]({**fields, "ids": masked}).tokens
                if tokens.shape[:2] != masked.shape or tokens.shape[-1] != self.width:
                    raise ConfigError(f"mlm.width={self.width}: the {self.modality} tower returns tokens "
                                      f"{tuple(tokens.shape)} for ids {tuple(masked.shape)}; expected one token per "
                                      f"id of width {self.width}")
                hidden[layer] = tokens[selected]
            return hidden[layer]

        metrics = {"rate": targets.new_tensor(rate, dtype=torch.float32), "masked": selected.sum().float()}
        if self.nesting:
            def exit_loss(e: Exit) -> tuple[Tensor, dict[str, Tensor]]:
                loss, acc = mlm_loss(self.logits(selected_tokens(e.layer)[:, :e.dim], model), targets)
                return loss, {"acc": acc}

            loss, last, per_exit = nested_losses(self.nesting, self.nesting.active(), exit_loss)
            metrics.update(per_exit)
        else:
            loss, acc = mlm_loss(self.logits(selected_tokens(None), model), targets)
            last = {"acc": acc}
        return ObjectiveOutput(loss, {**last, **metrics})

    def logits(self, hidden: Tensor, model: nn.Module) -> Tensor:
        """(N, V) fp32 vocabulary logits of (N, D) selected token features; D below the width uses the head's
        first D rows and columns (and the decoder's first D columns)."""
        h = self.transform(hidden).float()
        if self.decoder is not None:
            return self.decoder(h).float()
        bias = None if self.bias is None else self.bias.float()
        weight = tied_weight(model.encoders[self.modality], self.modality)
        return F.linear(h, weight[:, :h.shape[-1]].float(), bias)


MLM.__doc__ = (MLM.__doc__ or "") + NESTING_KEYS_DOC


def tied_weight(tower: nn.Module, modality: str) -> nn.Parameter:
    """The tower's input embedding matrix (V, D) the decoder is tied to."""
    embed = getattr(tower, "token_embed", None)
    if not isinstance(embed, nn.Embedding):
        raise ConfigError(f"mlm.tie: the {modality} tower ({type(tower).__name__}) has no token_embed to tie the "
                          "decoder to; set tie: false and vocab_size")
    return embed.weight


def _register_tied_weight(module: MLM, args: tuple) -> None:
    """Forward pre-hook, registered before DeepSpeed's own: under ZeRO-3 the tied embedding is used outside
    its module, so it becomes an external parameter of the objective and is gathered with it. (DeepSpeed 0.19
    also registers a partitioned parameter read by attribute inside a forward on its own, so the 2-rank test
    passes without this; the documented call keeps it from depending on that.)"""
    towers = args[2].encoders
    if module.modality not in towers:
        return  # forward says so in one line
    weight = tied_weight(towers[module.modality], module.modality)
    if hasattr(weight, "ds_id") and id(weight) not in getattr(module, "_external_params", {}):
        import deepspeed

        deepspeed.zero.register_external_parameter(module, weight)


def _check_settings(rate: float, schedule: str, rate_start: float | None, schedule_steps: int, mask_prob: float,
                    random_prob: float, span_mean: float) -> None:
    """One-line ConfigErrors for masking settings out of range."""
    for key, value in (("rate", rate), ("rate_start", rate if rate_start is None else rate_start)):
        if not 0 < value <= 1:
            raise ConfigError(f"mlm.{key}={value}: expected 0 < {key} <= 1")
    if schedule not in SCHEDULES:
        raise ConfigError(f"mlm.schedule={schedule!r}{closest(schedule, SCHEDULES)}; valid: {', '.join(SCHEDULES)}")
    if schedule != "constant" and (schedule_steps <= 0 or rate_start is None):
        raise ConfigError(f"mlm.schedule={schedule!r}: needs rate_start and schedule_steps > 0 "
                          f"(got rate_start={rate_start}, schedule_steps={schedule_steps})")
    if not (0 <= mask_prob and 0 <= random_prob and mask_prob + random_prob <= 1):
        raise ConfigError(f"mlm.mask_prob={mask_prob}, random_prob={random_prob}: expected two shares >= 0 "
                          "summing to at most 1")
    if span_mean < 1:
        raise ConfigError(f"mlm.span_mean={span_mean}: expected >= 1 (mean span length in units)")



def fourier_positions(coords: Tensor, dim: int, max_freq: float = 64.0) -> Tensor:
    """(B, N, C) coordinates in [0, 1] -> (B, N, dim) sin/cos features at frequencies pi .. pi * max_freq
    (geometric), zero-padded to ``dim``: one parameter-free embedding for any grid or point layout."""
    c = coords.shape[-1]
    per = max(1, dim // (2 * c))
    freqs = math.pi * max_freq ** (torch.arange(per, device=coords.device, dtype=torch.float32) / max(1, per - 1))
    angles = (coords.float().unsqueeze(-1) * freqs).flatten(-2)  # (B, N, C * per)
    feats = torch.cat([angles.sin(), angles.cos()], -1)[..., :dim]
    return nn.functional.pad(feats, (0, dim - feats.shape[-1]))


def masked_mean_loss(per_token: Tensor, weight: Tensor) -> Tensor:
    """Mean of (B, N) ``per_token`` over the entries where ``weight`` (B, N) is 1, over the whole batch."""
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


class MaskedDecoder(nn.Module):
    """MAE's light decoder: project visible tokens, scatter them among mask tokens, add positions, a few
    transformer blocks, and a linear prediction of each patch's target."""

    def __init__(self, encoder_width: int, target_dim: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Linear(width, width)
        self.blocks = Transformer(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, target_dim)
        for m in (self.embed, self.pos, self.norm, self.pred):
            m.apply(init_weights)

    def forward(self, visible: Tensor, keep: Tensor, coords: Tensor, prefix: int,
                patch_mask: Tensor | None = None) -> Tensor:
        """Visible tokens (B, prefix + K, D), their patch indices (B, K), every patch's coordinates (B, N, C)
        -> predictions (B, N, target_dim)."""
        b, n = coords.shape[:2]
        x = self.embed(visible)
        slots = self.mask_token.to(x.dtype).expand(b, n, -1)
        slots = slots.scatter(1, keep.unsqueeze(-1).expand(-1, -1, self.width), x[:, prefix:])
        slots = slots + self.pos(fourier_positions(coords, self.width).to(x.dtype))
        mask = None
        if patch_mask is not None:
            mask = torch.cat([torch.ones(b, prefix, dtype=torch.bool, device=x.device), patch_mask], 1)
        out = self.norm(self.blocks(torch.cat([x[:, :prefix], slots], 1), mask))
        return self.pred(out[:, prefix:])


@objectives.register("masked_tokens")
class MaskedTokens(Objective):
    """Masked-token reconstruction (MAE, Audio-MAE, Point-MAE) for a tower with a stem/trunk split.

    Args:
        modality: the modality whose tower reconstructs its dropped patch tokens. encoder_width: that
        tower's token width (its ``width``). target_dim: size of one patch's target: patch*patch*channels
        for image/vit, mel*frames of a patch for audio/ast, group_size*3 for point_cloud/point_transformer
        (a mismatch is reported in one line naming the right value). mask_ratio: share of patch tokens
        dropped per sample (0: the encoder's default, 0.75 for image and audio, 0.6 for point groups).
        decoder_width: the decoder's token width. decoder_depth: decoder transformer blocks. decoder_heads:
        decoder attention heads. decoder_mlp_ratio: decoder MLP hidden size over its width.
    """

    uses_model = True
    tiny_configs = ({"modality": "image", "encoder_width": 32, "target_dim": 192, "decoder_width": 16,
                     "decoder_depth": 1, "decoder_heads": 2},)

    def __init__(self, modality: str = "image", encoder_width: int = 768, target_dim: int = 768,
                 mask_ratio: float = 0.0, decoder_width: int = 256, decoder_depth: int = 2, decoder_heads: int = 8,
                 decoder_mlp_ratio: float = 4.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"masked_tokens.mask_ratio: expected a ratio in [0, 1) (0: the encoder's default), "
                              f"got {mask_ratio}")
        # it encodes its own (masked) inputs and reads none of the pretrainer's outputs
        self.modalities = ()
        self.modality, self.mask_ratio = modality, float(mask_ratio)
        self.encoder_width, self.target_dim = encoder_width, target_dim
        self.decoder = MaskedDecoder(encoder_width, target_dim, decoder_width, decoder_depth, decoder_heads,
                                     decoder_mlp_ratio)

    def no_weight_decay(self) -> set[str]:
        """The mask token, as MAE."""
        return {"decoder.mask_token"}

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch, model: nn.Module) -> ObjectiveOutput:
        tower = self._tower(model)
        fields = batch.fields[self.modality]
        n = tower.num_patches(fields)
        b = batch.present[self.modality].shape[0]
        ratio = self.mask_ratio or tower.mask_ratio_default
        keep = random_keep(b, n, keep_count(n, ratio), batch.present[self.modality].device)
        out = tower({**fields, "keep": keep})  # a module call: ZeRO-3 gathers the tower's parameters
        extras = out.extras
        target = tower.reconstruction_target(extras["targets"])
        self._check_sizes(out.tokens.shape[-1], target.shape[-1])
        pred = self.decoder(out.tokens, keep, extras["coords"], out.tokens.shape[1] - keep.shape[1],
                            extras["patch_mask"])
        dropped = torch.ones(b, n, device=keep.device).scatter(1, keep, 0.0)
        weight = dropped * batch.present[self.modality].float().unsqueeze(1)
        if extras["patch_mask"] is not None:
            weight = weight * extras["patch_mask"].float()
        loss = masked_mean_loss(tower.reconstruction_loss(pred, target), weight)
        with torch.no_grad():
            # the trivial predictor: the mean target of the batch's dropped patches, for every patch
            mean = (target.float() * weight.unsqueeze(-1)).sum((0, 1)) / weight.sum().clamp_min(1)
            baseline = masked_mean_loss(tower.reconstruction_loss(mean.expand_as(target), target), weight)
        realised = torch.tensor(1.0 - keep.shape[1] / n)
        return ObjectiveOutput(loss=loss, metrics={"mean_baseline": baseline, "mask_ratio": realised})

    def _tower(self, model: nn.Module) -> PrefixTokenEncoder:
        tower = model.encoders[self.modality] if self.modality in model.encoders else None
        if not isinstance(tower, PrefixTokenEncoder):
            have = type(tower).__name__ if tower is not None else "no encoder"
            raise ConfigError(f"objectives.masked_tokens.modality: {self.modality!r} has {have}; masked_tokens needs "
                              "a tower with a stem/trunk split (image/vit, audio/ast, point_cloud/point_transformer)")
        return tower

    def _check_sizes(self, width: int, target_dim: int) -> None:
        for key, want, got in (("encoder_width", self.encoder_width, width), ("target_dim", self.target_dim, target_dim)):
            if want != got:
                raise ConfigError(f"objectives.masked_tokens.{key}: {want}, but the {self.modality} tower gives {got}; "
                                  f"set {key}: {got}")
