"""The one 2-rank launch of the objective tests: every clip/siglip/filip scenario of ``_clip_ranks.py``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from shardkit import fresh_env

from mmpt.training.engine import free_port

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def objective_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict[str, dict[str, torch.Tensor]]]]:
    """Run ``_clip_ranks.py`` on 2 gloo ranks once; return ``results(objective)`` -> each rank's scenarios."""
    out = tmp_path_factory.mktemp("objective_ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_clip_ranks.py"), str(out)]
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=fresh_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"ranks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    def results(objective: str) -> list[dict[str, dict[str, torch.Tensor]]]:
        return [torch.load(out / f"{objective}_rank{r}.pt") for r in range(2)]

    return results
