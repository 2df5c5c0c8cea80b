"""Where bfloat16 is native: the one check behind ``precision: auto`` (training and embedding)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

# torch's own CPU feature probes (cpuinfo): AVX512-BF16 (Intel Cooper Lake+, AMD Zen 4+) or AMX tiles (Sapphire Rapids+).
P = ParamSpec("P")
R = TypeVar("R")

CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: torch.device | str) -> bool:
    """True where ``device`` computes bfloat16 matmuls in hardware: a CUDA device with bf16 support, a CPU with
    AVX512-BF16 or AMX (there bf16 matmuls run ~2-4x fp32's); False elsewhere (bf16 is then emulated, slower)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in CPU_BF16_PROBES]
        return any(f is not None and f() for f in probes)
    return False


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention``, run in fp32 when it trains on a CPU under bf16 autocast: torch 2.11's
    CPU flash-attention kernel is 2-3x slower in bf16 than in fp32 forward+backward (64 x 3 heads x 65 tokens x 64,
    one thread: 51 vs 18 ms; causal 15 tokens: 14 vs 4 ms), and it was the largest cost of a bf16 training step
    (37% of a bench step's CPU time, more than every linear layer together). The output is fp32; the next
    projection casts it back under autocast."""
    if (q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                  is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def full_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast off (CPU and CUDA): for loss functions whose similarity logits must be fp32 even
    when an objective that runs a tower itself (``uses_model``) calls them inside the towers' autocast region,
    where a matmul of fp32 inputs would still give bf16 logits (and a float32-min fill would overflow them)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return run
