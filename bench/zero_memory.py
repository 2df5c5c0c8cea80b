"""Per-rank peak memory of training a ViT-B/32-size CLIP on 2 ranks at ZeRO stage 0, 2 and 3 (and 3 with
optimizer offload), built the way ``mmpt train`` builds it.

Each setting is one ``torchrun --nproc_per_node 2`` launch (gloo, CPU, fp32, AdamW): every rank builds
the engine with ``mmpt.training.engine.build_engine`` (at stage 3 each tower is partitioned as soon as it is
built: mmpt.parts.build), runs ``--steps`` training steps on a synthetic batch of ``--batch`` images and captions
per rank, and reports its peak resident set (``ru_maxrss``, which only grows, so every setting is a fresh
process) after building, after ``deepspeed.initialize`` and after the steps (and after each forward,
backward and step), plus what it holds after the last step: its share of the model's parameters, the
optimizer's fp32 master copy (DeepSpeed keeps one at stage 2 even in fp32; at stage 3 mmpt makes it the
parameter partition itself: mmpt.parts.build.share_fp32_master), the AdamW state and the gradient buffers (stage
2 frees its partitioned gradients after the step).

The ranks run with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--mmap-threshold``): glibc then returns every
freed block over 128 KiB to the system at once, so a peak measures memory in use. With glibc's adaptive
default, freed gathered weights and gradients stay in the heap and stage 3's peak varies by some hundred
MB between ranks and runs (see the README).

``zero3_naive`` is the reference the issue names: the whole model built on every rank and then handed to
ZeRO-3 (no partitioning while building) with DeepSpeed's default buckets and its fp32 master copy.
Printed and written to ``bench/results/zero_memory.json``: per setting the larger of the two ranks' peaks
and its ratio to stage 0 (goal: stage 3 <= 0.6x).

    .venv/bin/python bench/zero_memory.py [--steps 3] [--batch 2] [--threads 1] [--only zero0,zero3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, main_python, thread_env  # noqa: E402

GOAL = 0.6
# ViT-B/32 CLIP (OpenAI / OpenCLIP ViT-B-32): 224 px, patch 32, 768 wide, 12 layers; text 512 wide, 12 layers
TOWERS = {
    "image": {"name": "image/vit", "image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12},
    "text": {"name": "text/transformer", "context_length": 77, "width": 512, "depth": 12, "heads": 8},
}
EMBED_DIM = 512
# name -> train keys; the rest is mmpt's defaults
SETTINGS = {
    "zero0": {"zero_stage": 0},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": True},
    "zero3_naive": {"zero_stage": 3},
}

# what mmpt.training.engine.STAGE3_MEMORY replaces (DeepSpeed 0.19's defaults), for zero3_naive
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                      "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                      "sub_group_size": 1_000_000_000}


def config(setting: str, steps: int, batch: int, out_dir: str) -> dict:
    """The recipe every rank of ``setting`` builds."""
    train = {"out_dir": out_dir, "steps": steps, "precision": "fp32", "progress": False, **SETTINGS[setting]}
    return {"name": f"zero-memory-{setting}", "seed": 0, "model": {"embed_dim": EMBED_DIM, "encoders": TOWERS},
            "objectives": {"clip": {"name": "clip", "pairs": [["image", "text"]]}},
            "data": {"sources": ["synthetic"], "batch_size": batch, "required": ["image", "text"]},
            "optim": {"lr": 1e-4, "warmup_steps": 0}, "train": train}


def synthetic_batch(module, batch: int, rank: int):
    """``batch`` random images and captions of this rank, collated by the model's own data sides."""
    import torch

    from mmpt.contracts import Batch

    g = torch.Generator().manual_seed(rank)
    size = TOWERS["image"]["image_size"]
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    captions = [f"a photo of thing {rank}-{i} on a table next to a window" for i in range(batch)]
    fields = {"image": module.model.data["image"].fields_from_tensor(pixels),
              "text": module.model.data["text"].prepare(captions, train=True)}
    return Batch(fields=fields, present={m: torch.ones(batch, dtype=torch.bool) for m in fields},
                 keys=[f"r{rank}_{i}" for i in range(batch)])


def peak_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


def held(engine) -> dict[str, float]:
    """MB this rank holds of the model's parameters, the fp32 master copy, the AdamW state and gradients."""
    import torch

    def mb(tensors) -> float:
        return round(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2**20, 1)

    params = list(engine.module.parameters())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    shared = {t.data_ptr() for t in getattr(opt, "fp16_partitioned_groups_flat", None) or [] if t is not None}
    master = [t for t in (getattr(opt, "single_partition_of_fp32_groups", None)
                          or getattr(opt, "fp32_partitioned_groups_flat", None) or []) if t.data_ptr() not in shared]
    grads = [getattr(opt, "grad_partitions_flat_buffer", None), *(getattr(opt, "averaged_gradients", {}) or {}).values()]
    flat_grads = [g for item in grads for g in (item if isinstance(item, list) else [item])]
    return {"params_mb": mb(getattr(p, "ds_tensor", p) for p in params),
            "fp32_master_mb": mb(master),
            "adam_state_mb": mb(v for s in inner.state.values() for v in s.values()),
            "grad_buffers_mb": mb(flat_grads) + mb(p.grad for p in params if p.grad is not None)}


def child(setting: str, steps: int, batch: int, work: Path) -> None:
    """One rank of one setting: build, initialise, train ``steps`` steps; write its report."""
    from mmpt.config import load_config
    from mmpt.pretrainer import count_parameters, set_seed
    from mmpt.training import engine as engine_module
    from mmpt.training.engine import build_engine, init_distributed

    d = init_distributed()
    cfg = load_config(config(setting, steps, batch, str(work / "run")))
    set_seed(cfg.seed + d.rank)
    base = peak_mb()
    if setting == "zero3_naive":  # the whole model on every rank, then ZeRO-3 with DeepSpeed's defaults
        engine_module.build_module = lambda build, ds, device: build(None)
        engine_module.share_fp32_master = lambda optimizer: 0  # DeepSpeed's second fp32 copy, too
        cfg.train.deepspeed = {"zero_optimization": DEEPSPEED_DEFAULTS}
    t0 = time.perf_counter()
    engine, ds = build_engine(cfg, d, steps)
    built_s, after_init = time.perf_counter() - t0, peak_mb()
    data = synthetic_batch(engine.module, batch, d.rank)
    t0, losses, marks = time.perf_counter(), [], []
    for _ in range(steps):
        out = engine(data)
        marks.append(("fwd", round(peak_mb()), current_mb()))
        engine.backward(out["loss"])
        marks.append(("bwd", round(peak_mb()), current_mb()))
        engine.step()
        marks.append(("step", round(peak_mb()), current_mb()))
        losses.append(out["loss"].item())
    report = {"rank": d.rank, "peak_mb": round(peak_mb(), 1), "after_initialize_mb": round(after_init, 1),
              "imports_mb": round(base, 1), "build_s": round(built_s, 1),
              "steps_s": round(time.perf_counter() - t0, 1), "losses": losses,
              "params_m": round(count_parameters(engine.module) / 1e6, 2), **held(engine),
              "zero_optimization": ds["zero_optimization"], "marks": marks}
    (work / f"rank{d.rank}.json").write_text(json.dumps(report))


def run_setting(setting: str, a: argparse.Namespace, work: Path) -> dict:
    """One setting on two ranks in fresh processes; both ranks' reports."""
    from mmpt.training.engine import free_port

    work.mkdir(parents=True)
    cmd = [main_python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, "--child", setting, "--steps", str(a.steps),
           "--batch", str(a.batch), "--work", str(work)]
    t0 = time.perf_counter()
    extra = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else {}
    proc = subprocess.run(cmd, env=thread_env(a.threads, **extra), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{setting} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return {"peak_mb": max(r["peak_mb"] for r in ranks), "wall_s": round(time.perf_counter() - t0, 1), "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="training steps per setting")
    p.add_argument("--batch", type=int, default=2, help="samples per rank and step")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each rank")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the ranks (0: glibc's adaptive default)")
    p.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings to run")
    p.add_argument("--out", type=Path, default=RESULTS / "zero_memory.json", help="JSON results file")
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.steps, a.batch, a.work)
        return
    wanted = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SETTINGS]
    if unknown or "zero0" not in wanted:
        raise SystemExit(f"--only: settings are {', '.join(SETTINGS)} and must include zero0 (the ratios' base); "
                         f"got {a.only!r}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mmpt-zero-memory-") as tmp:
        for setting in wanted:
            results[setting] = run_setting(setting, a, Path(tmp) / setting)
            print(f"{setting}: peak {results[setting]['peak_mb']:.0f} MB per rank "
                  f"({results[setting]['wall_s']:.0f} s)", flush=True)
    base = results["zero0"]["peak_mb"]
    print(f"\nViT-B/32-size CLIP, {results['zero0']['ranks'][0]['params_m']} M params, 2 ranks (gloo, fp32), "
          f"batch {a.batch} per rank, {a.steps} steps, {a.threads} thread(s) per rank")
    print(f"{'setting':14s} {'peak MB':>8s} {'x zero0':>8s} {'params':>7s} {'master':>7s} {'adam':>7s} {'grads':>7s}")
    for setting, r in results.items():
        r["ratio_to_zero0"] = round(r["peak_mb"] / base, 3)
        h = r["ranks"][0]
        print(f"{setting:14s} {r['peak_mb']:8.0f} {r['ratio_to_zero0']:8.3f} {h['params_mb']:7.0f} "
              f"{h['fp32_master_mb']:7.0f} {h['adam_state_mb']:7.0f} {h['grad_buffers_mb']:7.0f}")
    ratio = results.get("zero3", {}).get("ratio_to_zero0")
    if ratio is not None:
        print(f"stage 3 / stage 0 per rank: {ratio:.3f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
    payload = {"benchmark": "zero_memory", "settings": {"steps": a.steps, "batch_per_rank": a.batch, "ranks": 2,
               "threads_per_rank": a.threads, "precision": "fp32", "backend": "gloo",
               "malloc_mmap_threshold": a.mmap_threshold or "glibc default"},
               "towers": TOWERS, "embed_dim": EMBED_DIM, "results": results, "ratio_zero3_to_zero0": ratio,
               "goal_ratio": GOAL, "goal_met": ratio is not None and ratio <= GOAL, "machine": machine(),
               "load_note": "measured on a machine shared with other jobs: times vary, peaks do not"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results: {a.out}")


if __name__ == "__main__":
    os.environ.setdefault("MMPT_DIST_TIMEOUT", "600")
    main()
