"""Tiny configs of every registered encoder and objective, and the step-0 weights a DeepSpeed engine
starts from; shared by test_zero_init.py (one rank, in process) and _train_ranks.py (two ranks)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from shardkit import tiny_config

from mmpt.config import load_config
from mmpt.pretrainer import set_seed

# One tiny config (or several, for variants that build different parameters) per registered name.
# test_zero_init fails naming any registered encoder or objective missing here.
ENCODER_CASES: dict[str, list[dict]] = {
    "image/vit": [{"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "stem": "patch"},
                  {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "stem": "conv"}],
    "image/timm": [{"model_name": "vit_tiny_patch16_224", "image_size": 32, "model_kwargs": {"depth": 2}}],
    "text/transformer": [{"context_length": 16, "width": 32, "depth": 2, "heads": 2}],
    "audio/ast": [{"sample_rate": 8000, "clip_seconds": 0.5, "n_fft": 256, "hop_length": 80, "n_mels": 16,
                   "f_max": 4000.0, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}],
    "protein/transformer": [{"context_length": 16, "width": 32, "depth": 2, "heads": 2, "pool": "mean"}],
    "point_cloud/point_transformer": [{"num_points": 64, "groups": 8, "group_size": 8, "width": 32, "depth": 2,
                                       "heads": 2, "pointnet_hidden": 16}],
}
OBJECTIVE_CASES: dict[str, list[dict]] = {
    "clip": [{"pairs": [["image", "text"]], "init_logit_scale": 20.0}],
}


def cases() -> dict[str, dict]:
    """Case id -> raw config: the tiny CLIP config with one part swapped for the case's."""
    from mmpt.registry import encoders

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

    from mmpt.train.engine import build_engine, init_distributed

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
