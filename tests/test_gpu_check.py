"""bench/gpu_check.sh (issue 21, part 4) checks its steps' arguments on any machine (--dry-run), and without a
GPU refuses to run rather than timing the CPU under GPU names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "HOME": str(ROOT)})


def test_dry_run_checks_every_step() -> None:
    res = run("--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line for line in res.stdout.splitlines() if line.startswith("== ")] == [
        "== 1/3 CUDA tests", "== 2/3 training throughput, ViT-B/32 size, bf16, batch 256",
        "== 3/3 embedding throughput (mmpt embed on the GPU, bf16 auto)"]
    assert "train_throughput: cuda bf16, 30 steps of 256" in res.stdout
    assert "dry run: arguments checked, nothing run" in res.stdout


def test_refuses_without_a_gpu() -> None:
    if torch.cuda.is_available():
        return  # on a GPU machine the real run is gpu_check.sh's own job
    res = run()
    assert res.returncode == 2 and "no CUDA device visible" in res.stderr
