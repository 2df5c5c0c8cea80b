"""Training-step cost in CPU seconds: mmpt vs OpenCLIP's trainer step, fp32 and bf16, one thread.

``train_throughput.py`` measures wall-clock samples/s of both whole trainers; on a machine shared with other
jobs (load average 20 on 2 cores here) wall time measures the neighbours. This script measures what a step
*costs*: ``time.process_time()`` of one optimizer step with ``OMP_NUM_THREADS=1`` (no thread ever waits for
another, so CPU time is the work done), median of 6 steps after 2 warm-ups, the two precisions alternating
step by step in one process per tool. Data loading is left out (both tools load in worker processes).

- **mmpt**: the DeepSpeed engine as ``mmpt train`` builds it (ZeRO 0, fused AdamW, clip 1.0), one
  ``plain_step`` per batch, on real batches of generated demo shards (context 77: web-length captions,
  see ``train_throughput.py``), trimmed as training trims them.
- **OpenCLIP**: in the peer venv, the body of ``open_clip_train.train.train_one_epoch`` for accum_freq 1:
  ``zero_grad``, model + ``ClipLoss`` under ``autocast`` (``amp_bf16``: ``torch.autocast("cpu", bfloat16)``),
  backward, ``clip_grad_norm_(1.0)``, ``AdamW.step`` (its decay / no-decay groups), logit-scale clamp; text
  at the full context, as its trainer always pads.
- **share of the peak**: step FLOPs (``torch.utils.flop_counter.FlopCounterMode``, one forward+backward,
  ``bench/flops.py``) over the step's CPU seconds, divided by the matmul peak measured the same way (CPU time of
  a 2048^2 matmul) in the same process at the same precision.

    python bench/train_step_cpu.py            # both contexts, both tools -> results/train_throughput_cpu_time.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, TinyClip, demo_data, machine, main_python, thread_env  # noqa: E402
from peer_env import ensure_peer_env, versions  # noqa: E402

STEPS, WARM = 8, 2

COMMON = """
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from flops import DTYPES, step_flops

def cpu_peak(precision, n=2048, repeats=5):
    a, b = torch.randn(n, n).to(DTYPES[precision]), torch.randn(n, n).to(DTYPES[precision])
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best

def _timed(fn):
    t = time.process_time(); fn(); return time.process_time() - t

def measure(steps, flops, batch):
    cpu = {p: [] for p in steps}
    for i in range(@STEPS@):
        for p, step in steps.items():
            dt = _timed(lambda: step(i))
            if i >= @WARM@:
                cpu[p].append(dt)
    out = {}
    for p in steps:
        s = statistics.median(cpu[p]); peak = cpu_peak("bf16" if "bf16" in p else "fp32")
        out[p] = {"cpu_s_per_step": s, "cpu_ms_per_sample": 1e3 * s / batch, "steps": cpu[p], "peak_flops": peak,
                  "step_flops": flops[p], "achieved_flops": flops[p] / s, "peak_fraction": flops[p] / s / peak}
    print("RESULT " + json.dumps(out))
""".replace("@STEPS@", str(STEPS + WARM)).replace("@WARM@", str(WARM))

MMPT = COMMON + """
from mmpt.config import load_config
from mmpt.data.loader import train_loader
from mmpt.nn.padding import trim_padding, trimmed_modalities
from mmpt.pretrainer import build_data_specs
from mmpt.training.engine import build_engine, init_distributed, with_resolved_precision
from mmpt.training.loop import plain_step
overrides, data, out = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
d = init_distributed()
engines = {}
for p in ("fp32", "bf16"):
    sets = overrides + [f"data.sources=[{data}]", "data.workers=0", f"train.precision={p}", "train.steps=100",
                        "optim.warmup_steps=2", f"train.out_dir={out}/{p}"]
    cfg, _ = with_resolved_precision(load_config("clip-tiny", sets), d.device)
    engines[p] = build_engine(cfg, d, 100)[0]
loader, _ = train_loader(cfg, build_data_specs(cfg), 0, 1)
it, trimmed = iter(loader), trimmed_modalities(engines["fp32"].module.model)
batches = [trim_padding(next(it), trimmed) for _ in range(@STEPS@)]
flops = {}
for p, e in engines.items():
    flops[p] = step_flops(lambda: e.module(batches[0])["loss"]); e.module.zero_grad(set_to_none=True)
measure({p: (lambda i, e=e: plain_step(e, batches[i])) for p, e in engines.items()}, flops, cfg.data.batch_size)
""".replace("@STEPS@", str(STEPS + WARM))

OPENCLIP = COMMON + """
import contextlib, open_clip
cfg_dir, name, batch = sys.argv[2], sys.argv[3], int(sys.argv[4])
open_clip.add_model_config(cfg_dir)
torch.manual_seed(0)
loss_fn, tok = open_clip.loss.ClipLoss(), open_clip.get_tokenizer(name)
data = [(torch.randn(batch, 3, 64, 64), tok([f"a red square number {i} on a blue field"] * batch)) for i in range(@STEPS@)]
runs, flops = {}, {}
for p in ("fp32", "amp_bf16"):
    m = open_clip.create_model(name, pretrained=None, output_dict=True).train()
    decay = [q for q in m.parameters() if q.ndim >= 2]
    rest = [q for q in m.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=5e-4)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if p == "amp_bf16" else contextlib.nullcontext

    def fwd(i, m=m, cast=cast):
        with cast():
            out = m(*data[i])
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def step(i, m=m, opt=opt, fwd=fwd):
        opt.zero_grad()
        fwd(i).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, norm_type=2.0)
        opt.step()
        with torch.no_grad():
            m.logit_scale.clamp_(0, 4.6052)

    flops[p] = step_flops(lambda fwd=fwd: fwd(0)); m.zero_grad(set_to_none=True)
    runs[p] = step
measure(runs, flops, batch)
""".replace("@STEPS@", str(STEPS + WARM))


def run(cmd: list[str]) -> dict:
    """Run one measuring process (one thread) and return its RESULT line."""
    res = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1))
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd[:3])}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "train_throughput_cpu_time.json")
    a = p.parse_args()
    peer_py, bench = ensure_peer_env(), str(Path(__file__).resolve().parent)
    work = Path(tempfile.mkdtemp(prefix="mmpt-bench-cpu-"))
    try:
        measure_all(a, peer_py, bench, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_all(a: argparse.Namespace, peer_py: Path, bench: str, work: Path) -> None:
    """Both contexts, both tools, both precisions; write the JSON."""
    from train_throughput import caption_stats, web_shards

    shards = demo_data(work / "data", 1000, 16, 64, 2)["train"]
    web = web_shards(shards, work / "web" / "train")
    configs, load = {}, {"before": machine()["load_avg_1_5_15"]}
    for ctx, kind, train in ((32, "demo", shards), (77, "web", web)):
        model = TinyClip(ctx=ctx)
        sets = model.mmpt_overrides() + [f"data.batch_size={a.batch_size}"]
        m = run([main_python(), "-c", MMPT, bench, json.dumps(sets), str(train[0].parent), str(work / f"run{ctx}")])
        cfg_dir = model.write_openclip_config(work / f"oc{ctx}")
        o = run([str(peer_py), "-c", OPENCLIP, bench, str(cfg_dir), "mmpt-bench-tiny", str(a.batch_size)])
        o = {"fp32": o["fp32"], "bf16": o["amp_bf16"]}
        for prec in ("fp32", "bf16"):
            ratio = o[prec]["cpu_s_per_step"] / m[prec]["cpu_s_per_step"]
            configs[f"ctx{ctx}-{kind}-{prec}"] = {"context": ctx, "precision": prec, "mmpt": m[prec], "openclip": o[prec],
                                                  "ratio_mmpt_over_openclip": ratio,
                                                  "captions": caption_stats(train, ctx, a.batch_size)}
            print(f"ctx{ctx}-{kind}-{prec}: mmpt {m[prec]['cpu_ms_per_sample']:.2f} CPU-ms/sample "
                  f"({100 * m[prec]['peak_fraction']:.0f}% of peak), OpenCLIP {o[prec]['cpu_ms_per_sample']:.2f} "
                  f"({100 * o[prec]['peak_fraction']:.0f}% of peak): {ratio:.2f}x", flush=True)
    load["after"] = machine()["load_avg_1_5_15"]
    payload = {"benchmark": "train_step_cpu", "settings": {"batch_size": a.batch_size, "threads": 1, "steps": STEPS,
               "warmup": WARM, "model": "TinyClip (bench/common.py)"}, "configurations": configs,
               "ratio_mmpt_over_openclip": {k: v["ratio_mmpt_over_openclip"] for k, v in configs.items()},
               "load_avg": load, "peer_env": versions(), "machine": machine()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
