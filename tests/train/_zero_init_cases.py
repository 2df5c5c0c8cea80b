"""Tiny configs of every registered encoder and objective, and the step-0 weights a DeepSpeed engine
starts from; shared by test_zero_init.py (one rank, in process) and _train_ranks.py (two ranks)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.pretrainer import set_seed
from mmpt.registry import encoders, objectives


def _tiny(registry: Any) -> dict[str, list[dict]]:
    """Each registered part's own ``tiny_configs`` (a part without any is missing: the tests say so)."""
    return {name: list(getattr(registry.get(name), "tiny_configs", ())) for name in registry.names()
            if getattr(registry.get(name), "tiny_configs", ())}


# One tiny config (or several, for variants that build different parameters) per registered name, from
# the part's class; test_zero_init fails naming any registered encoder or objective that declares none.
ENCODER_CASES: dict[str, list[dict]] = _tiny(encoders)
OBJECTIVE_CASES: dict[str, list[dict]] = _tiny(objectives)


def cases() -> dict[str, dict]:
    """Case id -> raw config: the tiny CLIP config with one part swapped for the case's."""
    out = {}
    for name, variants in ENCODER_CASES.items():
        for i, kw in enumerate(variants):
            raw = tiny_config(["unused.tar"], Path("unused"))
            raw["model"]["encoders"][encoders.get(name).modality] = {"name": name, **kw}
            out[f"{name}#{i}"] = raw
    for name, variants in OBJECTIVE_CASES.items():
        for i, kw in enumerate(variants):
            raw = tiny_config(["unused.tar"], Path("unused"))
            raw["objectives"] = {name: {"name": name, **kw}}
            out[f"{name}#{i}"] = raw
    return out


def initial_weights(raw: dict, stage: int, seed_offset: int = 0) -> dict[str, torch.Tensor]:
    """The consolidated weights of a fresh engine at ``stage`` (every rank must call this)."""
    import deepspeed

    from mmpt.training.engine import build_engine, init_distributed

    raw = copy.deepcopy(raw)
    raw["train"].update(zero_stage=stage, stage3_param_persistence_threshold=0)
    cfg = load_config(raw)
    d = init_distributed()
    set_seed(cfg.seed + seed_offset)  # train() seeds seed + rank: rank 0's draws must win
    engine, _ = build_engine(cfg, d, total_steps=1)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        weights = {n: p.detach().cpu().clone() for n, p in params.items()}
    engine.destroy()
    return weights


def digest(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Name -> sha256 of dtype, shape and bytes (bit-for-bit identity, small to ship between processes)."""
    return {n: hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(torch.uint8).numpy()
                              .tobytes()).hexdigest() for n, t in weights.items()}
