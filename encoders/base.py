"""Contracts shared by every modality: the encoder module, its output, and its data side.

An encoder file registers two things under the same modality:

* ``@encoders.register("image/vit")`` — an :class:`Encoder` (``nn.Module``) turning collated fields
  into an :class:`EncoderOutput`;
* ``@modalities.register("image")`` — a :class:`ModalityData` that knows the shard extensions of the
  modality, decodes a member, applies the train/eval transform and collates a list of samples into
  tensor fields. It is built from the same keyword arguments as the encoder (``from_encoder_config``),
  so a recipe states ``image_size`` once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from mmpt.data.budget import MiB, value_size
from mmpt.layers import masked_mean


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


class Encoder(nn.Module):
    """Base class of every modality encoder."""

    modality: ClassVar[str] = ""
    width: int
    # Keyword sets that build this encoder in milliseconds: the every-encoder contract test and the
    # ZeRO-3 init test run each, so a new encoder is tested by adding its file alone.
    tiny_configs: ClassVar[tuple[dict[str, Any], ...]] = ()
    # Keyword arguments that load weights while constructing (hub weights, a local file) and the value
    # that turns each off. Loading an export resets them: its tensors already hold the weights, and a
    # model file must not fetch or read anything else.
    weight_sources: ClassVar[dict[str, Any]] = {}

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in the trunk."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) excluded from weight decay besides norms and biases."""
        return set()


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
    followed by ``norm_pre`` -> ``trunk`` (``mmpt.layers.Transformer``) -> ``norm``, pooled by ``pool``
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


class Tokenizer(Protocol):
    """Contract of every token modality's tokenizer."""

    vocab_size: int
    pad_id: int
    mask_id: int
    bos_id: int | None
    eos_id: int | None
    context_length: int

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Return ids (B, L) long and mask (B, L) bool (True on real tokens)."""
        ...


@dataclass(frozen=True)
class DemoConcepts:
    """Attributes of N demo samples, shared by every modality that renders them (``mmpt data demo``).

    Each field is an (N,) int array indexing the vocabularies of :mod:`mmpt.data.demo`: ``shape`` into
    ``SHAPES`` (8), ``color`` into ``COLORS`` (10), ``size`` into ``SIZES`` (3), ``position`` into
    ``POSITIONS`` (5). Zero-shot prompts name shape and colour, so every modality renders at least
    those two learnably (an image draws them; a sound might map shape to rhythm and colour to pitch).
    """

    shape: Any
    color: Any
    size: Any
    position: Any

    def __len__(self) -> int:
        return len(self.shape)


class ModalityData:
    """Data side of a modality: extensions, decode, transform and collate.

    ``decode`` and ``transform`` run per sample in DataLoader workers; ``collate`` runs once per
    batch and should do the heavy lifting as batch tensor ops. ``collate`` receives ``None`` for
    samples lacking the modality and must produce rows for them anyway (the batch's presence mask
    says which rows are real).

    ``max_sample_bytes`` is what one decoded sample may cost (``data.max_sample_bytes.<modality>``
    overrides it per run); ``decoded_size`` reads what a member *will* decode to from its header and
    ``sample_size`` what a decoded value holds. The core checks both around ``decode``
    (:func:`mmpt.data.budget.decode_within_budget`) and skips a sample over it as ``too_large_<modality>``,
    so a new modality is guarded by declaring its limit and, where its format has a header, reading it.
    """

    modality: ClassVar[str] = ""
    extensions: ClassVar[tuple[str, ...]] = ()
    max_sample_bytes: int = 256 * MiB

    @classmethod
    def from_encoder_config(cls, **cfg: Any) -> ModalityData:
        """Build from an encoder's keyword arguments, taking only the keys this class needs."""
        import inspect

        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in cfg.items() if k in accepted})

    def decode(self, data: bytes, ext: str) -> Any:
        raise NotImplementedError

    def decoded_size(self, data: bytes, ext: str) -> int | None:
        """Bytes ``decode`` will allocate for this member, read from its header without decoding; None
        when the member's own size bounds it (default)."""
        return None

    def sample_size(self, value: Any) -> int:
        """Bytes a decoded value holds (default: its tensors, arrays and text)."""
        return value_size(value)

    def transform(self, value: Any, train: bool) -> Any:
        return value

    def collate(self, values: list[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare(self, raw: list[Any], train: bool = False) -> dict[str, Tensor]:
        """Turn raw user inputs (PIL images, strings, arrays, tensors) into collated fields."""
        return self.collate([self.transform(self.coerce(x), train) for x in raw])

    def coerce(self, value: Any) -> Any:
        """Convert one raw user input into what ``transform`` takes (default: unchanged)."""
        return value

    def render_demo(self, concepts: DemoConcepts, rng: Any) -> list[dict[str, bytes]]:
        """Shard members (``{ext: bytes}``, decodable by :meth:`decode`) rendering each demo concept;
        ``rng`` is a ``numpy.random.Generator``. Vectorise over the N concepts where it pays."""
        raise NotImplementedError(f"modality {self.modality!r} has no demo renderer")

    @property
    def file_prefix(self) -> str:
        """Prefix of this modality's output files (``<prefix>_emb/``); default: the modality name."""
        return self.modality

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """Collated fields from one bare batch tensor a user passed to ``encode``, checked; a modality
        whose fields cannot be told from one tensor refuses it (default)."""
        from mmpt.registry import ConfigError

        raise ConfigError(f"encode('{self.modality}', tensor): a bare tensor is ambiguous for this modality; "
                          f"pass a dict of collated fields or a list of raw inputs")


def stack_present(values: list[Tensor | None], like: Tensor | None = None) -> Tensor:
    """Stack per-sample tensors, filling absent samples (None) with zeros of the same shape."""
    ref = like if like is not None else next((v for v in values if v is not None), None)
    if ref is None:
        raise ValueError("stack_present: every sample lacks this modality; nothing to infer a shape from")
    zero = torch.zeros_like(ref)
    return torch.stack([zero if v is None else v for v in values])
