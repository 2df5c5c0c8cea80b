"""Build the trainable module so that the same seed gives the same initial weights at every ZeRO stage.

For encoder and objective authors: initialise parameters the ordinary PyTorch way, inside your
``__init__`` (``nn.init.*`` on any submodule, ``self.apply(fn)``, a third-party constructor such as
``timm.create_model`` that initialises its own children). Nothing here needs calling from a part, and
``tests/train/test_zero_init.py`` fails until a registered part has a tiny config there, then checks
that its ZeRO-3 model equals its stage-0 model bit for bit.

Why not DeepSpeed's ``zero.Init`` context: it partitions each submodule's parameters the moment that
submodule's ``__init__`` returns, so init code in a parent acts on empty tensors (only ``Module.apply``
is patched to gather). mmpt's text ``token_embed`` kept std 1.0 instead of 0.02, the skipped draws
shifted every later tensor, and timm's ``named_apply`` init was lost entirely. The context also creates
tensors on the accelerator in the training dtype, so even untouched defaults would come from the CUDA
generator (and bf16 arithmetic) rather than the CPU generator stages 0-2 draw from.

What :func:`build_module` does instead: every part the builder reports (encoder, objective) is
constructed exactly as at stages 0-2 (CPU, fp32, same random draws in the same order) and partitioned
as soon as its constructor returns; heads and anything else are partitioned when the whole module is
built. A rank therefore holds at most one whole part plus its shards of the rest, never the whole
model. Partitioning broadcasts rank 0's values, as ``deepspeed.initialize`` does at stages 0-2, so
per-rank seeds do not matter.

Changing weights *after* the engine exists (surgery on a live ZeRO-3 module) is different: gather
with ``deepspeed.zero.GatheredParameters(params, modifier_rank=0)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_module(build: Callable[[Callable[[nn.Module], None] | None], M], ds_config: dict[str, Any] | None,
                 device: torch.device) -> M:
    """``build(on_part)`` where the builder calls ``on_part`` on each part (encoder, objective) it has
    just built; for a ZeRO-3 ``ds_config`` that partitions the part, and the rest is partitioned at the
    end. Without one (stages 0-2, no DeepSpeed) it is just ``build(None)``."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return build(None)
    module = build(lambda part: partition(part, ds_config, device))
    partition(module, ds_config, device)
    return module


def partition(module: nn.Module, ds_config: dict[str, Any], device: torch.device) -> None:
    """Shard ``module``'s not yet partitioned parameters over the ranks (rank 0's values win), cast to
    the training dtype first as ``deepspeed.initialize`` casts an unpartitioned module; buffers move to
    ``device`` and keep their dtype, as at stages 0-2."""
    import deepspeed

    dtype = _param_dtype(ds_config)
    todo = [p for p in module.parameters() if not hasattr(p, "ds_id")]
    for p in todo:
        if dtype is not None and p.is_floating_point():
            p.data = p.data.to(dtype)
    for b in module.buffers():
        b.data = b.data.to(device)
    if todo:
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)


def _param_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The dtype DeepSpeed trains parameters in (None: leave them as built)."""
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return None


def share_fp32_master(optimizer: Any) -> int:
    """Let a ZeRO-3 optimizer's fp32 master partitions be the parameter partitions they copy when both are
    fp32 on one device; returns the bytes freed.

    DeepSpeed 0.19 means to do this itself (``_create_fp32_partitions`` in ``runtime/zero/stage3.py``: "we
    don't need another copy of the weights") but compares a ``torch.device`` with the string
    ``current_device_name()`` ('cpu', 'cuda:0'), which is never equal, so fp32 training kept a second copy of
    every partition (288 MB per rank for a ViT-B/32 CLIP on 2 ranks, bench/zero_memory.py). The step then
    updates the parameters in place and DeepSpeed's copy back after it copies a tensor onto itself.
    Offloaded and swapped sub-groups keep their own buffers, as DeepSpeed intends.
    """
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    high = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not low or not high or getattr(optimizer, "offload_optimizer", True):
        return 0
    freed = 0
    for lp, hp in zip(low, high, strict=True):
        if (lp is not None and hp is not None and lp is not hp and lp.dtype == hp.dtype and lp.device == hp.device
                and lp.shape == hp.shape and hp.numel() and hp.data_ptr() != lp.data_ptr()):
            freed += hp.numel() * hp.element_size()
            hp.data = lp.data
    return freed
