"""Encoder-side helpers for modality files: the prefix-token (CLS + patches) encoder with the masked-modelling
path, token dropping and collation helpers. The contracts themselves (:class:`Encoder`, :class:`EncoderOutput`,
:class:`ModalityData`) live in :mod:`mmpt.contracts`.

An encoder file registers two things under the same modality:

* ``@encoders.register("image/vit")`` — an :class:`Encoder` (``nn.Module``) turning collated fields
  into an :class:`EncoderOutput`;
* ``@modalities.register("image")`` — a :class:`ModalityData` that knows the shard extensions of the
  modality, decodes a member, applies the train/eval transform and collates a list of samples into
  tensor fields. It is built from the same keyword arguments as the encoder (``from_encoder_config``),
  so a recipe states ``image_size`` once.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mmpt.contracts import Encoder, EncoderOutput, StemOutput
from mmpt.nn.layers import masked_mean


def keep_count(tokens: int, drop: float) -> int:
    """How many of ``tokens`` stay visible when a ratio ``drop`` of them is dropped (at least one)."""
    return max(1, min(tokens, round(tokens * (1.0 - drop))))


def check_token_drop(ratio: float) -> float:
    """``train_token_drop`` checked to lie in [0, 1)."""
    from mmpt.registry import ConfigError

    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"train_token_drop: expected a ratio in [0, 1), got {ratio}")
    return float(ratio)


def random_keep(batch: int, tokens: int, keep: int, device: torch.device | str | None = None) -> Tensor:
    """(B, keep) indices of visible tokens, uniform without replacement and independent per row, drawn
    from torch's RNG in one op (MAE's argsort of uniform noise), ascending in each row."""
    return torch.rand(batch, tokens, device=device).argsort(1)[:, :keep].sort(1).values


class PrefixTokenEncoder(Encoder):
    """An encoder whose ``stem(inputs) -> StemOutput`` puts one CLS token before its patch/group tokens,
    followed by ``norm_pre`` -> ``trunk`` (``mmpt.nn.layers.Transformer``) -> ``norm``, pooled by ``pool``
    ('cls': the first token, 'mean': the mean of the other real ones). Subclasses build those modules
    and ``stem``.

    Masked modelling goes through ``forward``: a ``keep`` field (B, K) long of visible patch indices
    runs the trunk on the prefix and those patches only, and ``extras`` carries ``keep`` and the stem's
    ``targets``, ``coords`` and patch ``mask`` of *all* patches (ZeRO-3 gathers the tower's parameters
    for a module call; a caller driving ``stem`` and ``trunk`` itself would touch them ungathered).
    ``train_token_drop`` (FLIP) drops that ratio of patches at random in training forwards without
    ``keep``; eval forwards see every patch.
    """

    pool: str
    norm_pre: nn.Module
    trunk: nn.Module
    norm: nn.Module
    # Share of patch tokens masked_tokens drops unless its config says otherwise (MAE / Audio-MAE).
    mask_ratio_default: ClassVar[float] = 0.75
    train_token_drop: float = 0.0

    def stem(self, inputs: dict[str, Tensor], with_targets: bool = False) -> StemOutput:  # pragma: no cover
        raise NotImplementedError

    def forward_trunk(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Tokens -> normalised tokens."""
        return self.norm(self.trunk(self.norm_pre(tokens), mask))

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        keep = inputs.get("keep")
        s = self.stem(inputs, with_targets=keep is not None)
        extras: dict[str, Tensor] = {}
        if keep is not None:
            extras = {"keep": keep, "targets": s.targets, "coords": s.coords,
                      "patch_mask": None if s.mask is None else s.mask[:, s.prefix:]}
        elif self.training and self.train_token_drop > 0:
            n = s.tokens.shape[1] - s.prefix
            keep = random_keep(s.tokens.shape[0], n, keep_count(n, self.train_token_drop), s.tokens.device)
        tokens, mask = (s.tokens, s.mask) if keep is None else visible_tokens(s, keep)
        tokens = self.forward_trunk(tokens, mask)
        pooled = tokens[:, 0] if self.pool == "cls" else masked_mean(tokens[:, s.prefix:], None if mask is None
                                                                     else mask[:, s.prefix:])
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled, extras=extras)

    def num_patches(self, inputs: dict[str, Tensor]) -> int:  # pragma: no cover - abstract
        """How many patch tokens (after the prefix) the stem makes of these collated fields."""
        raise NotImplementedError

    def reconstruction_target(self, targets: Tensor) -> Tensor:
        """The stem's (B, N, P) targets as the loss compares them (default: unchanged)."""
        return targets

    def reconstruction_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """(B, N) distance per patch between predictions and prepared targets (default: mean squared error)."""
        return (pred.float() - target.float()).square().mean(-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable


def visible_tokens(s: StemOutput, keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """The prefix tokens and the patch tokens at ``keep`` (B, K), with their mask."""
    b, _, d = s.tokens.shape
    prefix = torch.arange(s.prefix, device=keep.device).expand(b, -1)
    idx = torch.cat([prefix, keep.to(s.tokens.device) + s.prefix], 1)
    tokens = s.tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
    return tokens, None if s.mask is None else s.mask.gather(1, idx)


def stack_present(values: list[Tensor | None], like: Tensor | None = None) -> Tensor:
    """Stack per-sample tensors, filling absent samples (None) with zeros of the same shape."""
    ref = like if like is not None else next((v for v in values if v is not None), None)
    if ref is None:
        raise ValueError("stack_present: every sample lacks this modality; nothing to infer a shape from")
    zero = torch.zeros_like(ref)
    return torch.stack([zero if v is None else v for v in values])
