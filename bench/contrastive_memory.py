"""Peak memory of one contrastive training step at global batch 2048: GradCache (chunks of 128) vs plain.

Each configuration runs in a subprocess of its own, one after the other: ``ru_maxrss`` is a process's
peak resident set and never goes down, so only a fresh process measures one step. A child builds the
DeepSpeed engine (one rank, ZeRO 0, fp32, AdamW) of a CLIP with the towers pinned below (clip-tiny's
ViT-era towers), a synthetic batch of ``--batch`` images and captions, records its peak so far,
runs one training step with ``train.step`` plain or gradcache (``train.gradcache_chunk`` = ``--chunk``),
and records the peak again. Printed and written to ``bench/results/contrastive_memory.json``: both peaks,
the step's own share (peak after minus peak before the step), both ratios GradCache / plain (the goal
is <= 0.15 of the peak), the losses (equal: the same model and batch) and the step times.

    .venv/bin/python bench/contrastive_memory.py [--batch 2048] [--chunk 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, main_python, thread_env  # noqa: E402

GOAL = 0.15
# clip-tiny's towers as they were when this benchmark was written (ViT image tower), pinned here so the
# benchmark does not move when the recipe does; no BatchNorm, so both steps compute the same gradients.
TOWERS = {
    "image": {"name": "image/vit", "image_size": 48, "patch_size": 8, "width": 128, "depth": 4, "heads": 4,
              "stem": "conv", "pool": "cls"},
    "text": {"name": "text/transformer", "context_length": 24, "width": 128, "depth": 4, "heads": 4,
             "causal": True, "pool": "eot"},
}
EMBED_DIM = 128


def config(step: str, batch: int, chunk: int, out_dir: str) -> dict:
    """The recipe one child trains a step of."""
    train = {"out_dir": out_dir, "steps": 1, "zero_stage": 0, "precision": "fp32", "progress": False, "step": step}
    if step == "gradcache":
        train["gradcache_chunk"] = chunk
        train["gradcache_mmap_threshold"] = 1 << 20  # opt-in: freed chunk activations leave (page-fault cost)
    return {"name": f"memory-{step}", "seed": 0,
            "model": {"embed_dim": EMBED_DIM, "encoders": TOWERS},
            "objectives": {"clip": {"name": "clip", "pairs": [["image", "text"]]}},
            "data": {"sources": ["synthetic"], "batch_size": batch, "required": ["image", "text"]},
            "optim": {"lr": 1e-3, "warmup_steps": 0}, "train": train}


def synthetic_batch(module, batch: int):
    """``batch`` random images and captions, collated by the model's own data sides."""
    import torch

    from mmpt.contracts import Batch

    g = torch.Generator().manual_seed(0)
    size = TOWERS["image"]["image_size"]
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
    captions = [f"a {colours[i % 4]} {shapes[(i // 4) % 4]} number {i}" for i in range(batch)]
    fields = {"image": module.model.data["image"].fields_from_tensor(pixels),
              "text": module.model.data["text"].prepare(captions, train=True)}
    present = {m: torch.ones(batch, dtype=torch.bool) for m in fields}
    return Batch(fields=fields, present=present, keys=[f"s{i:05d}" for i in range(batch)])


def peak_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident set now (Linux ``/proc/self/statm``), 0 where there is none."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def child(step: str, batch: int, chunk: int, out_dir: str) -> dict:
    """Build the engine and the batch, then run one step; the peaks before and after it."""
    from mmpt.config import load_config
    from mmpt.pretrainer import count_parameters, set_seed
    from mmpt.training.engine import build_engine, init_distributed
    from mmpt.training.loop import step_strategy

    imported = rss_mb()  # python, torch, deepspeed, mmpt
    cfg = load_config(config(step, batch, chunk, out_dir))
    set_seed(cfg.seed)
    engine, ds = build_engine(cfg, init_distributed(), 1)
    built = rss_mb()
    data = synthetic_batch(engine.module, batch)
    before = peak_mb()
    ready = rss_mb()
    t0 = time.perf_counter()
    out = step_strategy(cfg)(engine, data)
    seconds = time.perf_counter() - t0
    after = peak_mb()
    return {"step": step, "peak_mb": round(after, 1), "peak_before_step_mb": round(before, 1),
            "step_mb": round(after - before, 1), "step_s": round(seconds, 2), "loss": out["loss"].item(),
            "params_m": round(count_parameters(engine.module) / 1e6, 3),
            "rss_after_imports_mb": round(imported, 1), "rss_after_engine_mb": round(built, 1),
            "rss_before_step_mb": round(ready, 1),
            "deepspeed_micro_batch": ds["train_micro_batch_size_per_gpu"],
            "deepspeed_accumulation": ds["gradient_accumulation_steps"]}


def run_child(step: str, a: argparse.Namespace, work: Path) -> dict:
    """One configuration in a fresh process; its JSON line back."""
    cmd = [main_python(), __file__, "--child", step, "--batch", str(a.batch), "--chunk", str(a.chunk),
           "--work", str(work)]
    proc = subprocess.run(cmd, env=thread_env(a.threads), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{step} step failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2048, help="global contrastive batch (one rank)")
    p.add_argument("--chunk", type=int, default=128, help="GradCache samples per forward")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each child")
    p.add_argument("--out", type=Path, default=RESULTS / "contrastive_memory.json", help="JSON results file")
    p.add_argument("--child", choices=["plain", "gradcache"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.chunk, str(a.work))), flush=True)
        return
    if a.batch % a.chunk:
        raise SystemExit(f"--chunk {a.chunk} does not divide --batch {a.batch}")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmpt-memory-") as tmp:
        results = {step: run_child(step, a, Path(tmp) / step) for step in ("plain", "gradcache")}
    plain, cached = results["plain"], results["gradcache"]
    ratio = cached["peak_mb"] / plain["peak_mb"]
    step_ratio = cached["step_mb"] / plain["step_mb"]
    print(f"one contrastive step, batch {a.batch} (GradCache chunks of {a.chunk}), {plain['params_m']} M params, "
          f"{a.threads} threads")
    print(f"{'step':10s} {'peak MB':>9s} {'before MB':>10s} {'step MB':>9s} {'step s':>7s} {'loss':>9s}")
    for r in (plain, cached):
        print(f"{r['step']:10s} {r['peak_mb']:9.0f} {r['peak_before_step_mb']:10.0f} {r['step_mb']:9.0f} "
              f"{r['step_s']:7.1f} {r['loss']:9.5f}")
    met = "met" if ratio <= GOAL else "NOT met"
    print(f"ratio GradCache / plain: peak {ratio:.3f} (goal <= {GOAL}: {met}), the step's own memory {step_ratio:.3f}")
    payload = {"benchmark": "contrastive_memory", "settings": {"batch": a.batch, "chunk": a.chunk, "threads": a.threads,
               "zero_stage": 0, "precision": "fp32", "ranks": 1},
               "towers": TOWERS, "embed_dim": EMBED_DIM, "results": results, "ratio_peak": ratio,
               "ratio_step": step_ratio, "goal_ratio_peak": GOAL, "goal_met": ratio <= GOAL, "machine": machine()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
