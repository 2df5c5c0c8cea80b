"""Where bfloat16 is native: the one check behind ``precision: auto`` (training and embedding)."""

from __future__ import annotations

import torch

# torch's own CPU feature probes (cpuinfo): AVX512-BF16 (Intel Cooper Lake+, AMD Zen 4+) or AMX tiles (Sapphire Rapids+).
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
