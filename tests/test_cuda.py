"""CUDA checks (issue 21, part 4): bf16 training, NCCL on one GPU with ZeRO-3, bf16 embeddings against fp32.

Marked ``cuda`` and skipped where no GPU is present (CI and these 2-core machines have none):
``bench/gpu_check.sh`` runs them on a GPU machine (``pytest -m cuda``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mmpt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")]


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_on_one_gpu(tiny_cfg: dict, tmp_path: Path, stage: int) -> None:
    """Auto precision is bf16 on a bf16 GPU; NCCL with one rank; ZeRO-3 partitions and still learns."""
    summary = mmpt.train(tiny_cfg, train__steps=6, train__zero_stage=stage, train__precision="auto",
                         data__workers=1, train__out_dir=tmp_path / f"z{stage}")
    assert summary.steps == 6 and np.isfinite(summary.final_loss)
    assert next(summary.engine.module.parameters()).device.type == "cuda"
    assert torch.distributed.get_backend() == "nccl"
    model, _, _ = mmpt.load(summary.run_dir, "cuda")
    assert next(model.parameters()).device.type == "cuda"


def test_bf16_embeddings_match_fp32(tiny_cfg: dict, tmp_path: Path, color_shards: list[str]) -> None:
    from mmpt.commands.embed import embed
    from mmpt.commands.export import export

    summary = mmpt.train(tiny_cfg, train__steps=4, data__workers=1, train__out_dir=tmp_path / "run")
    model = export(summary.run_dir, tmp_path / "m.safetensors")
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        embed(str(model), color_shards[0], "image", str(out), batch_size=8, device="cuda", progress=False,
              precision=precision, dtype="float32")
        rows[precision] = np.concatenate([np.load(f) for f in sorted((out / "img_emb").glob("*.npy"))])
    cos = (rows["fp32"] * rows["bf16"]).sum(1)
    assert rows["fp32"].shape == rows["bf16"].shape and cos.min() > 0.99
