"""Catch typos in ``train.deepspeed``: DeepSpeed ignores keys it does not know, so a misspelt one
silently does nothing. Unknown keys get a warning naming the closest key DeepSpeed reads."""

from __future__ import annotations

import warnings
from typing import Any

from mmpt.registry import closest

# Top-level sections and switches of DeepSpeed 0.19's config (docs: "DeepSpeed Configuration JSON").
TOP_LEVEL = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
communication_data_type seq_parallel_communication_data_type prescale_gradients gradient_predivide_factor
sparse_gradients fp16 bf16 amp torch_autocast gradient_clipping zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer aio activation_checkpointing sparse_attention flops_profiler tensorboard wandb
csv_monitor comet comms_logger autotuning elasticity data_efficiency curriculum_learning compression_training
checkpoint data_types steps_per_print wall_clock_breakdown dump_state memory_breakdown pipeline nebula
eigenvalue progressive_layer_drop quantize_training dataloader_drop_last disable_allgather zenflow timers
graph_harvesting hybrid_engine weight_quantization compile tensor_parallel sequence_parallel_size
gradient_allreduce_op use_data_before_expert_parallelism
""".split())


def _zero_keys() -> frozenset[str]:
    """Field names and aliases of DeepSpeed's ZeRO config model (plus keys read outside it)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # deepspeed not importable: nothing to compare against
        return frozenset()
    names = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return frozenset(names | {"mics_shard_size", "mics_hierarchical_params_gather"})


def check_deepspeed_keys(extra: dict[str, Any], path: str) -> list[str]:
    """Warn about keys of ``extra`` DeepSpeed does not read; returns the warning texts."""
    problems = [_unknown(key, TOP_LEVEL, f"{path}.{key}") for key in extra if key not in TOP_LEVEL]
    zero = extra.get("zero_optimization")
    if isinstance(zero, dict):
        known = _zero_keys()
        if known:
            problems += [_unknown(k, known, f"{path}.zero_optimization.{k}") for k in zero if k not in known]
    for text in problems:
        warnings.warn(text, stacklevel=3)
    return problems


def _unknown(key: str, known: frozenset[str], where: str) -> str:
    return f"{where}: DeepSpeed does not read this key and would ignore it{closest(key, known)}"
