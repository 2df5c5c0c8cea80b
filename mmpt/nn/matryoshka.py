"""Nested sizes for any objective: Matryoshka (MRL, Kusupati et al. 2022) and 2D Matryoshka (Starbucks).

One option set, the same keys on ``clip``, ``siglip`` and ``mlm`` (:data:`NESTING_KEYS_DOC`):

* ``matryoshka_dims: [32, 64, 128, 256]``: the loss is summed (weighted by ``matryoshka_weights``) over
  every prefix size ``d`` of the feature: the first ``d`` dims of the projected embedding, L2-normalised
  again (contrastive), or the first ``d`` dims of the hidden state through the head's first ``d`` rows and
  columns (masked LM);
* ``starbucks: [[2, 32], [4, 64], ..., [12, 768]]``: (layer, dim) pairs, small to large; each step sums the
  loss over every pair, the tower run to its ``layer``-th block (:func:`mmpt.nn.layers.layer_exit`: its
  final norm, pooling and head applied there), then cut to ``dim``;
* ``starbucks_sample: true``: the random sub-model baseline (2DMSE-style): each step the largest pair
  plus one pair drawn uniformly from the others, the draw seeded by the step so every rank draws the same.

:class:`Nesting` holds the parsed option and says which (layer, dim) exits a step trains; the objectives
keep their own loss and only loop over :meth:`Nesting.active`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.nn.layers import layer_exit
from mmpt.registry import ConfigError

NESTING_KEYS_DOC = """
Nested sizes (mmpt.nn.matryoshka): matryoshka_dims: Matryoshka sizes, e.g. [32, 64, 128, 256]: the loss is
summed over the first d dims of every size d (each prefix re-normalised; for mlm the hidden state's first d dims
through the head's first d rows and columns); null: the full size only. matryoshka_weights: one weight per size
(default 1 each). starbucks: Starbucks' 2D list of [layer, dim] pairs from small to large: every step sums the
loss over all pairs, each tower stopped after its first `layer` transformer blocks (final norm, pooling and head
applied there) and cut to `dim`. starbucks_sample: train the largest pair plus one other pair drawn at random
each step (the random sub-model baseline) instead of every pair.
"""


@dataclass(frozen=True)
class Exit:
    """One nested size: the tower's first ``layer`` blocks (None: all) and the first ``dim`` dims (None: all)."""

    layer: int | None
    dim: int | None
    weight: float = 1.0

    @property
    def name(self) -> str:
        """Metric label, e.g. ``d64`` or ``L4_d64``."""
        return ("" if self.layer is None else f"L{self.layer}_") + ("full" if self.dim is None else f"d{self.dim}")


def _positive_ints(values: Any, key: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{key}: expected a non-empty list of sizes, got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"{key}: expected positive integers, got {values!r}")
    return list(values)


def parse_exits(objective: str, dims: Any = None, weights: Any = None, pairs: Any = None) -> list[Exit]:
    """The exits of ``matryoshka_dims`` (+ ``matryoshka_weights``) or ``starbucks``, small to large; [] for neither."""
    if dims is not None and pairs is not None:
        raise ConfigError(f"{objective}: give matryoshka_dims or starbucks, not both (starbucks pairs carry the dims)")
    if dims is None and pairs is None:
        if weights is not None:
            raise ConfigError(f"{objective}.matryoshka_weights: needs matryoshka_dims or starbucks")
        return []
    if dims is not None:
        sizes = _positive_ints(dims, f"{objective}.matryoshka_dims")
        if sizes != sorted(set(sizes)):
            raise ConfigError(f"{objective}.matryoshka_dims: expected distinct sizes from small to large, got {sizes}")
        points: list[tuple[int | None, int]] = [(None, d) for d in sizes]
    else:
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ConfigError(f"{objective}.starbucks: expected a list of [layer, dim] pairs, got {pairs!r}")
        points = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"{objective}.starbucks[{i}]: expected [layer, dim], got {pair!r}")
            layer, dim = _positive_ints(list(pair), f"{objective}.starbucks[{i}]")
            points.append((layer, dim))
        if any(b[0] < a[0] or b[1] < a[1] or b == a for a, b in zip(points, points[1:])):
            raise ConfigError(f"{objective}.starbucks: expected pairs from small to large (layer and dim "
                              f"non-decreasing, no repeats), got {[list(p) for p in points]}")
    if weights is None:
        ws = [1.0] * len(points)
    else:
        if not isinstance(weights, (list, tuple)) or len(weights) != len(points) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights):
            raise ConfigError(f"{objective}.matryoshka_weights: expected {len(points)} weights >= 0 (one per size), "
                              f"got {weights!r}")
        ws = [float(w) for w in weights]
    return [Exit(layer, dim, w) for (layer, dim), w in zip(points, ws, strict=True)]


def prefix(x: Tensor, dim: int | None, normalize: bool = True) -> Tensor:
    """The first ``dim`` features of ``x`` (..., E), L2-normalised again unless ``normalize`` is False (``dim``
    None: ``x`` unchanged)."""
    if dim is None:
        return x
    if dim > x.shape[-1]:
        raise ConfigError(f"nested size {dim}: larger than the feature size {x.shape[-1]}")
    x = x[..., :dim]
    return F.normalize(x.float(), dim=-1) if normalize else x


class Nesting(nn.Module):
    """The parsed nested-size option of one objective; ``bool(nesting)`` is False when none is set.

    In sample mode a persistent ``step`` buffer counts training forwards (a resumed run continues its draws).
    """

    def __init__(self, objective: str, dims: Any = None, weights: Any = None, starbucks: Any = None,
                 sample: bool = False):
        super().__init__()
        self.objective = objective
        self.exits = parse_exits(objective, dims, weights, starbucks)
        self.sample = bool(sample)
        if self.sample:
            if starbucks is None and dims is None:
                raise ConfigError(f"{objective}.starbucks_sample: needs starbucks (or matryoshka_dims) to sample from")
            if len(self.exits) < 2:
                raise ConfigError(f"{objective}.starbucks_sample: needs at least two pairs to sample from")
            self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def __bool__(self) -> bool:
        return bool(self.exits)

    @property
    def uses_layers(self) -> bool:
        """True when some exit stops a tower early (the objective must run towers itself)."""
        return any(e.layer is not None for e in self.exits)

    def active(self) -> list[Exit]:
        """The exits this forward trains: every one, or in sample mode the largest plus one drawn by the step."""
        if not self.sample:
            return list(self.exits)
        g = torch.Generator().manual_seed(int(self.step))
        if self.training:
            self.step += 1
        drawn = int(torch.randint(len(self.exits) - 1, (1,), generator=g))
        return [self.exits[drawn], self.exits[-1]]

    def check_dims(self, size: int, what: str) -> None:
        """A ConfigError when a nested size exceeds ``size`` (the embedding or hidden width)."""
        big = [e.dim for e in self.exits if e.dim is not None and e.dim > size]
        if big:
            key = "starbucks" if self.uses_layers else "matryoshka_dims"
            raise ConfigError(f"{self.objective}.{key}: size {big[0]} is larger than {what} ({size})")

    def total(self, terms: list[tuple[Exit, Tensor]]) -> Tensor:
        """The weighted sum of each exit's loss."""
        return torch.stack([e.weight * loss for e, loss in terms]).sum()


def nested_losses(nesting: Nesting, exits: list[Exit],
                  loss_of: Callable[[Exit], tuple[Tensor, dict[str, Tensor]]],
                  ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """(weighted sum of ``loss_of(exit)`` over ``exits``, the largest exit's metrics, ``<exit>/loss`` per exit)."""
    terms, per_exit, last = [], {}, {}
    for e in exits:
        loss, last = loss_of(e)
        terms.append((e, loss))
        per_exit[f"{e.name}/loss"] = loss.detach()
    return nesting.total(terms), last, per_exit


def nested_pair_losses(nesting: Nesting, exits: list[Exit], views: LayerViews, a: str, b: str,
                       loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
                       ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """:func:`nested_losses` of a two-tower loss ``loss_fn(emb_a, emb_b)`` on the (layer, dim) views of ``a``, ``b``."""
    return nested_losses(nesting, exits, lambda e: loss_fn(views(e.layer, a, e.dim), views(e.layer, b, e.dim)))


class LayerViews:
    """Embeddings of a step's modalities at a layer, each computed once: the pretrainer's ``outputs`` at full
    depth, else the tower run again (a module call, so ZeRO-3 gathers what runs) stopped after its first
    ``layer`` blocks, its final norm, pooling and projection head applied there."""

    def __init__(self, model: nn.Module | None, outputs: dict[str, Any], batch: Any, where: str):
        self.model, self.outputs, self.batch, self.where = model, outputs, batch, where
        self.cache: dict[tuple[int | None, str], Tensor] = {}

    def __call__(self, layer: int | None, modality: str, dim: int | None = None) -> Tensor:
        """(B, dim) L2-normalised embedding of ``modality`` at ``layer`` (None: full depth), cut to ``dim``."""
        key = (layer, modality)
        if key not in self.cache:
            if layer is None:
                self.cache[key] = self.outputs[modality].embedding
            else:
                assert self.model is not None, "layer exits need the model (the objective sets uses_model)"
                with layer_exit(self.model.encoders[modality], layer, self.where):
                    self.cache[key] = self.model.encode_fields(modality, self.batch.fields[modality]).embedding
        return prefix(self.cache[key], dim)


class NestedLinear(nn.Linear):
    """A Linear that also runs on the first ``d`` input features: its weight's first ``d`` columns (and, with
    ``nested_out``, first ``d`` rows and bias entries, for square layers of a nested head)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, nested_out: bool = False):
        super().__init__(in_features, out_features, bias)
        self.nested_out = nested_out

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        if d == self.in_features:
            return super().forward(x)
        out = d if self.nested_out else self.out_features
        return F.linear(x, self.weight[:out, :d], None if self.bias is None else self.bias[:out])


class NestedLayerNorm(nn.LayerNorm):
    """A LayerNorm over the first ``d`` features when given ``d`` < its width (its first ``d`` weights and biases)."""

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        if d == self.normalized_shape[-1]:
            return super().forward(x)
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)
