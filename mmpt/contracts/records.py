"""Module outputs: dicts with attribute access, so DeepSpeed ZeRO-3 finds their tensors (see TensorRecord)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


class TensorRecord(dict):
    """A dict with attribute access, used for module outputs.

    DeepSpeed ZeRO-3 looks for tensors in a module's outputs (tuples, lists, dicts — not
    dataclasses) to hook the backward pass that re-gathers the module's own parameters. An encoder
    that owns a parameter directly (``pos_embed``, ``cls_token``) and returned a dataclass would get
    a gradient into a partitioned parameter; returning a dict subclass keeps the typed, attribute
    style API and lets any one-file encoder own parameters however it likes.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class EncoderOutput(TensorRecord):
    """What an encoder returns.

    tokens: (B, T, D) per-token features; mask: (B, T) bool, True where a token is real (None: all
    real); pooled: (B, D) one vector per sample. ``embedding`` is filled by the model's projection
    head (L2-normalised, shared embedding size) and ``extras`` carries modality-specific tensors
    such as reconstruction targets.
    """

    tokens: Tensor
    mask: Tensor | None
    pooled: Tensor
    embedding: Tensor | None
    extras: dict[str, Tensor]

    def __init__(self, tokens: Tensor, mask: Tensor | None, pooled: Tensor, embedding: Tensor | None = None,
                 extras: dict[str, Tensor] | None = None):
        super().__init__(tokens=tokens, mask=mask, pooled=pooled, embedding=embedding, extras=extras or {})


@dataclass
class StemOutput:
    """Output of a continuous modality's stem: tokens before the trunk.

    positions: (B, T) long index of each token in the full grid (so masked modelling can drop
    tokens and keep positions); targets: (B, N, P) reconstruction targets of the N = T - prefix patch
    tokens (or None); prefix: number of leading tokens that are not patches (CLS/register tokens);
    coords: (B, N, C) where each patch token sits, in [0, 1] (grid cell centre, group centre), for a
    masked-modelling decoder's positions; mask: (B, T) bool, True where a token is real (None: all).
    """

    tokens: Tensor
    positions: Tensor
    targets: Tensor | None = None
    prefix: int = 0
    coords: Tensor | None = None
    mask: Tensor | None = None


class ObjectiveOutput(TensorRecord):
    """Loss of one objective plus detached metrics (accuracy, logit scale, ...); a dict subclass so
    ZeRO-3 hooks the backward of objectives that own parameters (see TensorRecord)."""

    loss: Tensor
    metrics: dict[str, Tensor]

    def __init__(self, loss: Tensor, metrics: dict[str, Tensor] | None = None):
        super().__init__(loss=loss, metrics=metrics or {})
