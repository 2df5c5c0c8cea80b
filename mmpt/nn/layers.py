"""Transformer building blocks shared by the from-scratch encoders (image, text, audio, ...).

Attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA) and
separate ``nn.Linear`` projections, so LoRA-style adapters can wrap them.

Incremental decoding: every forward takes an optional :class:`KVCache`. Without one nothing changes; with
one, each attention layer appends the keys and values of the new positions to its entry (cross-attention
projects its memory once), so a decoder fed one new token per step never recomputes the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpt.nn.precision import attention
from mmpt.registry import ConfigError


class AttentionCache:
    """Keys and values (B, heads, T, head_dim) one attention layer has seen so far."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.mask: Tensor | None = None  # cross-attention: the memory's (B, S) mask

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v


class KVCache:
    """State of one incremental decode: an :class:`AttentionCache` per attention module (created on first
    use, keyed by the module) and ``length``, the positions already decoded (the caller advances it)."""

    def __init__(self) -> None:
        self.entries: dict[int, AttentionCache] = {}
        self.length = 0

    def entry(self, module: nn.Module) -> AttentionCache:
        """The cache of ``module``, empty on first use."""
        return self.entries.setdefault(id(module), AttentionCache())

    def advance(self, steps: int) -> None:
        """Record that ``steps`` more positions went through every layer."""
        self.length += steps

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (N,) of every entry, in that order (beam search picks and repeats rows)."""
        for e in self.entries.values():
            if e.k is not None:
                e.k, e.v = e.k.index_select(0, index), e.v.index_select(0, index)
            if e.mask is not None:
                e.mask = e.mask.index_select(0, index)


def _prefix_causal_mask(t: int, past: int, device: torch.device) -> Tensor:
    # (t, past + t): new query i sits at position past + i and sees every key up to it
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past)


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, D) with an optional key padding mask."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            return self._cached(q, k, v, mask, cache.entry(self))
        attn_mask = None
        if mask is not None and not self.causal:
            # (B, 1, 1, T): every query may attend to real keys only
            attn_mask = mask[:, None, None, :]
        elif mask is not None:
            # causal + padding: a padded key sits after the last real token, so causality already
            # hides it from every real query; padded queries are ignored downstream.
            attn_mask = None
        out = attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)  # fp32 when training under CPU bf16
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def _cached(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, entry: AttentionCache) -> Tensor:
        # Decoding feeds real tokens only (every row advances together), so the new queries need just
        # causality against the cached prefix; a padding mask would have to cover the prefix too.
        if mask is not None and not bool(mask.all()):
            raise ValueError("Attention with a KV cache: padded positions cannot be cached (pass real tokens only)")
        past = 0 if entry.k is None else entry.k.shape[2]
        if not self.causal and past:
            raise ValueError("Attention with a KV cache: a bidirectional layer cannot decode incrementally")
        k, v = entry.append(k, v)
        b, _, t, hd = q.shape
        attn_mask = _prefix_causal_mask(t, past, q.device) if self.causal and t > 1 else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * hd))


class CrossAttention(nn.Module):
    """Multi-head attention from (B, T, D) queries to a (B, S, memory_width) memory with an optional
    (B, S) bool mask (True: real). With a cache the memory is projected once, on the first step, and
    later steps may pass ``memory=None``."""

    def __init__(self, width: int, heads: int, memory_width: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(memory_width or width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        entry = cache.entry(self) if cache is not None else None
        if entry is not None and entry.k is not None:
            k, v, memory_mask = entry.k, entry.v, entry.mask
        else:
            if memory is None:
                raise ValueError("CrossAttention: no memory given and none cached")
            s = memory.shape[1]
            k, v = self.kv(memory).view(b, s, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if entry is not None:
                entry.append(k, v)
                entry.mask = memory_mask
        attn_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        # Called without the cache argument when there is none: encoders may swap in attention modules
        # of their own (protein's rotary attention) that take (x, mask) only.
        h = self.norm1(x)
        x = x + (self.attn(h, mask) if cache is None else self.attn(h, mask, cache))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: x + cross(norm(x), memory), x + mlp(norm(x)) (CoCa's multimodal
    layers interleave it with causal :class:`Block` s)."""

    def __init__(self, width: int, heads: int, memory_width: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.norm_memory = nn.LayerNorm(memory_width or width)
        self.cross = CrossAttention(width, heads, memory_width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        memory = None if memory is None else self.norm_memory(memory)
        x = x + self.cross(self.norm1(x), memory, memory_mask, cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks with optional activation checkpointing.

    ``exit_at``: when set (by :func:`layer_exit`), forwards run the first ``exit_at`` blocks only, so the
    tower that owns this stack returns its layer-``exit_at`` output (through its own final norm and pooling).
    """

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal) for _ in range(depth))
        self.grad_checkpointing = False
        self.exit_at: int | None = None
        self.apply(init_weights)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        blocks = self.blocks if self.exit_at is None else self.blocks[:self.exit_at]
        for block in blocks:
            if cache is not None:  # incremental decoding: inference only, nothing to checkpoint
                x = block(x, mask, cache)
            elif self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


def exit_trunk(tower: nn.Module, where: str = "layer") -> Transformer:
    """The block stack of ``tower`` that layer exits truncate (its ``layer_trunk()``), or a ConfigError."""
    find = getattr(tower, "layer_trunk", None)
    trunk = find() if find is not None else None
    if not isinstance(trunk, Transformer):
        raise ConfigError(f"{where}: the {getattr(tower, 'modality', '') or type(tower).__name__} tower "
                          f"({type(tower).__name__}) has no layer exits (they need a trunk of mmpt.nn.layers "
                          "Transformer blocks)")
    return trunk


@contextmanager
def layer_exit(tower: nn.Module, layer: int | None, where: str = "layer") -> Iterator[None]:
    """Within the block, ``tower``'s forwards stop after its first ``layer`` trunk blocks (None: all of them),
    its final norm and pooling applied there. Module calls as usual, so ZeRO-3 gathers what runs."""
    if layer is None:
        yield
        return
    trunk = exit_trunk(tower, where)
    if not 1 <= layer <= len(trunk.blocks):
        raise ConfigError(f"{where}={layer}: expected 1 <= layer <= {len(trunk.blocks)} (the depth of the "
                          f"{getattr(tower, 'modality', '') or type(tower).__name__} tower)")
    before, trunk.exit_at = trunk.exit_at, layer
    try:
        yield
    finally:
        trunk.exit_at = before


def init_weights(m: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases (ViT/CLIP practice)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real tokens (B, T, D) -> (B, D)."""
    if mask is None:
        return tokens.mean(1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1)


def last_token(tokens: Tensor, mask: Tensor) -> Tensor:
    """The last real token of each row (EOT pooling that does not rely on argmax over ids)."""
    idx = mask.long().sum(1).clamp_min(1) - 1
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), idx]
