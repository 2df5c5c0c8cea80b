"""Distributed set-up and ``deepspeed.initialize``: ZeRO stage, precision, optimizer, schedule.

Accumulation, clipping, precision, ZeRO stage and offload are DeepSpeed config, not loop code.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mmpt.config import Config
from mmpt.nn.precision import native_bf16
from mmpt.parts.build import build_module, share_fp32_master
from mmpt.pretrainer import Pretrainer, build_pretrainer
from mmpt.registry import ConfigError
from mmpt.training.launcher import watch_launcher
from mmpt.training.startup import skip_shm_comm_op

log = logging.getLogger("mmpt")


@dataclass
class DistInfo:
    """Rank, world size and device of this process."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int | None = None) -> DistInfo:
    """Join (or create) the process group: gloo on CPU, NCCL on CUDA; no launcher needed for one rank.
    A rank a launcher started stops when the launcher dies (mmpt.training.launcher)."""
    import deepspeed
    import torch.distributed as dist

    watch_launcher()

    if "RANK" not in os.environ:  # a single process without torchrun: set the rendezvous ourselves
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    skip_shm_comm_op()  # a C++ build on first use, for inference only (mmpt.training.startup)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or int(os.environ.get("MMPT_DIST_TIMEOUT", 1800)))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timeout, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """What ``train.precision`` means on ``device`` (default: CUDA when present, else CPU). 'auto' -> 'bf16'
    where the device computes bfloat16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), 'fp16' on
    older GPUs, 'fp32' elsewhere. 'bf16' is autocast with fp32 weights (:meth:`Pretrainer.set_autocast`);
    asked for on a CPU without native bf16 it runs, emulated, with a warning; 'fp16' needs CUDA."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        if native_bf16(kind):
            return "bf16"
        return "fp16" if kind == "cuda" else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"train.precision: fp16 needs a CUDA device; use bf16, fp32 or auto on {kind}")
    if precision == "bf16" and kind == "cpu" and not native_bf16(kind):
        warnings.warn("train.precision: bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it is "
                      "emulated and usually slower than fp32; use train.precision=auto or fp32", stacklevel=1)  # once a process
    return precision


def with_resolved_precision(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """``cfg`` with ``train.precision`` resolved on ``device`` (the run config, its checkpoints and a resume's
    comparison record what ran, not 'auto'), and the words the run's first line states it in."""
    asked = cfg.train.precision
    ran = resolve_precision(asked, device)
    how = {"bf16": "bf16 autocast, fp32 weights", "fp16": "fp16 (DeepSpeed loss scaling)"}.get(ran, "fp32")
    if asked == "auto":
        native = "native" if ran == "bf16" else "no native"
        how += f" (auto: {native} bf16 on this {device.type.upper()}{'; train.precision=fp32 turns it off' if ran == 'bf16' else ''})"
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=ran))
    return resolved, how


# ZeRO-3 is chosen to save memory: DeepSpeed's defaults (buckets of 5e8 elements, every parameter kept
# live and reused) let a rank touch a whole model's worth of gathered weights and gradients per step, so
# stage 3 used 1.34x stage 0's peak on bench/zero_memory.py; these keep each transient to ~40 MB fp32.
# train.deepspeed overrides them (larger buckets overlap more communication on GPUs).
STAGE3_MEMORY = {"reduce_bucket_size": 10_000_000, "stage3_prefetch_bucket_size": 10_000_000,
                 "stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 0,
                 "sub_group_size": 10_000_000}


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed config dict derived from the recipe (``train.deepspeed`` entries override it)."""
    t = cfg.train
    precision = resolve_precision(t.precision)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # memory_efficient_linear off: on, zero.Init swaps torch.nn.functional.linear process-wide for DeepSpeed's
        # Function, which under bf16 autocast rounds x @ W.T before adding the bias, so stage-3 losses left
        # stage 0's from step 2 (tests/train/test_zero3_linear.py)
        zero.update(stage3_param_persistence_threshold=t.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=True, memory_efficient_linear=False, **STAGE3_MEMORY)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_param:
        if t.zero_stage != 3:
            raise ConfigError("train.offload_param: parameter offload needs train.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro, chunks = cfg.data.batch_size, 1
    if t.step == "gradcache":  # each chunk's re-forward is one DeepSpeed micro-step (mmpt.training.gradcache)
        micro, chunks = t.gradcache_chunk, cfg.data.batch_size // t.gradcache_chunk
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum * chunks,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # bf16 is torch.autocast around the forward with fp32 weights and optimizer (Pretrainer.set_autocast),
        # not DeepSpeed's bf16 mode, which casts the parameters themselves to bf16.
        "bf16": {"enabled": False},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # A torch optimizer is passed in; with CPU offload DeepSpeed would swap it for its C++ CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    _merge(ds, t.deepspeed)
    return ds


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def param_groups(module: Pretrainer, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: no decay for 1-d params (norms, biases), logit scales, embeddings and whatever
    the parts list in ``no_weight_decay``; per-prefix lr multipliers from ``optim.lr_scale``."""
    o = cfg.optim
    no_wd = module.no_weight_decay()
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    unknown = set(o.lr_scale)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        decay = len(shape) >= 2 and name not in no_wd
        scale = 1.0
        best = -1
        for prefix, s in o.lr_scale.items():
            if name.startswith(prefix) and len(prefix) > best:
                scale, best = s, len(prefix)
                unknown.discard(prefix)
        groups.setdefault((decay, scale), []).append(p)
    if unknown:
        raise ConfigError(f"optim.lr_scale: prefix {sorted(unknown)[0]!r} matches no parameter "
                          f"(names start with e.g. model.encoders.image, model.encoders.text, objectives)")
    return [{"params": ps, "weight_decay": o.weight_decay if d else 0.0, "lr": o.lr * s, "lr_scale": s}
            for (d, s), ps in groups.items()]


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warmup then cosine (or constant) decay to ``min_lr_ratio`` of the base lr."""
    o = cfg.optim
    warm = max(o.warmup_steps, 0)

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_engine(cfg: Config, dist_info: DistInfo, total_steps: int):
    """Construct the Pretrainer (at stage 3 each part is partitioned once built, so no rank holds the
    whole model, and the weights equal stage 0's: see mmpt.parts.build) and wrap it with DeepSpeed.
    Returns (engine, ds_config)."""
    import deepspeed

    ds = deepspeed_config(cfg, dist_info.world)
    module = build_module(lambda on_part: build_pretrainer(cfg, on_part), ds, dist_info.device)
    bf16 = resolve_precision(cfg.train.precision, dist_info.device) == "bf16"
    module.set_autocast(dist_info.device.type, torch.bfloat16 if bf16 else None)
    o = cfg.optim
    # fused: one kernel per step over all tensors instead of ~10 passes per tensor (same update within
    # float rounding, tests/train/test_speed.py); the CPU has the kernel too.
    optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    share_fp32_master(engine.optimizer)  # fp32 at ZeRO-3: no second copy of the parameters (see mmpt.parts.build)
    if skips_allreduce(ds, dist_info.world):
        engine.enable_backward_allreduce = False
    if cfg.train.compile:  # in place: parameter names, checkpoints and exports stay the same
        for tower in module.model.encoders.values():
            tower.compile()
    return engine, ds


def skips_allreduce(ds: dict[str, Any], world: int) -> bool:
    """One rank at stage 0: DeepSpeed's gradient all-reduce would flatten every gradient, reduce it with
    itself, scale by 1/1 and copy it back (a few passes over all gradients per step) for no change."""
    return world == 1 and ds["zero_optimization"]["stage"] == 0 and "communication_data_type" not in ds
