"""Share of the peak for bench/train_throughput.py: FLOPs of one training step and the matmul peak, measured
inside each tool's own training process (the drivers below wrap ``mmpt train`` and OpenCLIP's trainer).

- **peak**: the best of several square matmuls (n=2048) in the run's compute dtype (fp32, or bf16 tensors for
  bf16 autocast), with the process's own thread settings, before training starts;
- **step FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward+backward of the tool's own
  model and loss after training (mmpt: the Pretrainer on real batches from its loader, trimmed as it trains,
  mean of 3; OpenCLIP: its model + ``ClipLoss`` on a batch at the full context, which its trainer always
  runs). Matmul-class ops only (mm, bmm, addmm, convolution, attention), as FlopCounterMode counts.

This file imports in either venv: torch at the top, mmpt / open_clip inside the functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(precision: str, n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of the fastest of ``repeats`` (n x n) @ (n x n) matmuls in ``precision``'s dtype (two warm-ups)."""
    dtype = DTYPES[precision]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``step()`` (returning a loss) plus its backward, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step().backward()
    return int(counter.get_total_flops())


def mmpt_step_flops(recipe: str, overrides: list[str], batches: int = 3) -> dict:
    """Mean FLOPs per step (and per sample) of mmpt's Pretrainer on ``batches`` real, trimmed batches."""
    from mmpt.config import load_config
    from mmpt.data.loader import train_loader
    from mmpt.nn.padding import trim_padding, trimmed_modalities
    from mmpt.pretrainer import build_data_specs, build_pretrainer
    from mmpt.training.engine import resolve_precision

    cfg = load_config(recipe, overrides)
    module = build_pretrainer(cfg).train()
    bf16 = resolve_precision(cfg.train.precision, "cpu") == "bf16"
    module.set_autocast("cpu", torch.bfloat16 if bf16 else None)
    loader, _ = train_loader(cfg, build_data_specs(cfg), 0, 1)
    it, trimmed, counts = iter(loader), trimmed_modalities(module.model), []
    for _ in range(batches):
        batch = trim_padding(next(it), trimmed)
        counts.append(step_flops(lambda b=batch: module(b)["loss"]))
        module.zero_grad(set_to_none=True)
    per_step = sum(counts) / len(counts)
    return {"step_flops": per_step, "flops_per_sample": per_step / cfg.data.batch_size, "flops_batches": counts}


def openclip_step_flops(model_name: str, precision: str, batch_size: int) -> dict:
    """FLOPs per step (and per sample) of OpenCLIP's model + ClipLoss, under its trainer's autocast for amp_bf16."""
    import contextlib

    import open_clip

    model = open_clip.create_model(model_name, pretrained=None, output_dict=True).train()
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(batch_size, 3, *size)
    texts = open_clip.get_tokenizer(model_name)(["a red square on a blue background"] * batch_size)
    loss = open_clip.loss.ClipLoss()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "amp_bf16" else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with cast:
            out = model(images, texts)
            return loss(out["image_features"], out["text_features"], out["logit_scale"])

    per_step = step_flops(step)
    return {"step_flops": per_step, "flops_per_sample": per_step / batch_size}


# argv: probe.json precision bench_dir recipe n_overrides overrides... -- mmpt train argv...
MMPT_DRIVER = """
import json, sys, time
probe_path, precision, bench_dir, recipe, n = sys.argv[1:6]
overrides = sys.argv[6:6 + int(n)]
argv = sys.argv[6 + int(n):]
sys.path.insert(0, bench_dir)
from flops import matmul_peak, mmpt_step_flops
t0 = time.perf_counter()
probe = {"peak_flops": matmul_peak(precision)}
probe["probe_s"] = time.perf_counter() - t0
from mmpt.cli import main
rc = main(argv)
if rc == 0:
    t0 = time.perf_counter()
    probe.update(mmpt_step_flops(recipe, overrides))
    probe["probe_s"] += time.perf_counter() - t0
    open(probe_path, "w").write(json.dumps(probe))
sys.exit(rc)
"""

# argv: probe.json precision bench_dir model_cfg_dir model_name batch_size oc_precision -- trainer argv...
OPENCLIP_DRIVER = """
import json, sys, time
probe_path, precision, bench_dir, cfg_dir, name, batch, oc_precision = sys.argv[1:8]
sys.path.insert(0, bench_dir)
import open_clip
open_clip.add_model_config(cfg_dir)
from flops import matmul_peak, openclip_step_flops
t0 = time.perf_counter()
probe = {"peak_flops": matmul_peak(precision)}
probe["probe_s"] = time.perf_counter() - t0
from open_clip_train.main import main
main(sys.argv[8:])
t0 = time.perf_counter()
probe.update(openclip_step_flops(name, oc_precision, int(batch)))
probe["probe_s"] += time.perf_counter() - t0
open(probe_path, "w").write(json.dumps(probe))
"""


def peak_share(rate: dict, probe: dict, model_flops_per_sample: float) -> dict:
    """Achieved FLOP/s of a run (its own step FLOPs x steady samples/s) over its process's matmul peak, and the
    same for the model's full-context FLOPs per sample (one work unit for both tools)."""
    achieved = probe["flops_per_sample"] * rate["samples_per_s"]
    model = model_flops_per_sample * rate["samples_per_s"]
    return {"peak_flops": probe["peak_flops"], "flops_per_sample": probe["flops_per_sample"],
            "achieved_flops": achieved, "peak_fraction": achieved / probe["peak_flops"],
            "model_flops_per_sample": model_flops_per_sample, "model_peak_fraction": model / probe["peak_flops"]}
