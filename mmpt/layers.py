"""Transformer building blocks shared by the from-scratch encoders (image, text, audio, ...).

Attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA) and
separate ``nn.Linear`` projections, so LoRA-style adapters can wrap them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


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

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None and not self.causal:
            # (B, 1, 1, T): every query may attend to real keys only
            attn_mask = mask[:, None, None, :]
        elif mask is not None:
            # causal + padding: a padded key sits after the last real token, so causality already
            # hides it from every real query; padded queries are ignored downstream.
            attn_mask = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)
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

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks with optional activation checkpointing."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal) for _ in range(depth))
        self.grad_checkpointing = False
        self.apply(init_weights)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


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
