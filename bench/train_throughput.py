"""Training throughput: mmpt vs OpenCLIP's own trainer (open_clip_train), in one run.

Both tools train the same tiny CLIP (ViT with a patch stem and CLS pooling + causal text tower with
EOT pooling, equal widths / depths / heads, linear projections) on the same freshly generated demo
shards, fp32 on CPU, one process, with the same batch size, step count, data workers, thread count
(OMP_NUM_THREADS / MKL_NUM_THREADS), learning rate, warm-up, weight decay and gradient clipping.
They run one after the other, never at the same time.

  mmpt:     `mmpt train clip-tiny --set ...` (ZeRO stage 0, one rank, DeepSpeed engine)
  OpenCLIP: `open_clip_train.main.main([...])` in the peer venv bench/.peer-venv (OpenCLIP 3.3's
            trainer needs webdataset 0.2.86; created on first use by bench/peer_env.py), with the
            model config registered through `open_clip.add_model_config`.

Steady-state samples/s comes from each tool's own log windows (mmpt: metrics.jsonl `samples_per_s`
per `train.log_every` steps; OpenCLIP: the window average `Batch (t)` of its `Train Epoch:` lines),
counting only the windows that start after the first --skip-frac of the steps, as total samples
over total time. Wall time of each whole command (start-up, data start, checkpoint) is reported too.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MMPT,
    OC_MODEL_NAME,
    RESULTS,
    add_model_args,
    brace,
    demo_data,
    medians,
    model_from_args,
    report,
    run_logged,
    steady_rate,
    thread_env,
)
from peer_env import ensure_peer_env, versions  # noqa: E402

# OpenCLIP 3.3, open_clip_train/train.py:
# "Train Epoch: 0 [ 640/3840 (17%)] Data (t): 0.004 Batch (t): 0.712, 89.9/s, 89.9/s/gpu LR: ..."
# Data (t) / Batch (t) are averages over the window since the previous line; the "/s" figure is
# the last step alone, so the window averages are used here.
OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")

OC_DRIVER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
             "from open_clip_train.main import main; main(sys.argv[2:])")

PARAMS_OC = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
             "m = open_clip.create_model(sys.argv[2], pretrained=None); "
             "print(sum(p.numel() for p in m.parameters()))")


def run_mmpt(data: Path, model, a, work: Path, tag: str, steps: int | None = None) -> dict | None:
    """One mmpt training run; ``steps`` set: an untimed warm-up run of that many steps (returns None)."""
    out = work / f"mmpt-{tag}"
    n_steps = steps or a.steps
    sets = model.mmpt_overrides() + [
        f"data.sources=[{data / 'train'}]", f"data.batch_size={a.batch_size}", f"data.workers={a.workers}",
        f"data.shuffle_buffer={a.shuffle_buffer}", f"train.steps={n_steps}", f"train.log_every={a.log_every}",
        f"train.checkpoint_every={n_steps}", "train.eval_every=0", "train.progress=false", "train.zero_stage=0",
        "train.precision=fp32", "train.grad_accum=1", f"train.grad_clip={a.grad_clip}", f"train.out_dir={out}",
        f"optim.lr={a.lr}", f"optim.warmup_steps={a.warmup}", f"optim.weight_decay={a.wd}", "optim.schedule=cosine"]
    cmd = [str(MMPT), "train", "clip-tiny"] + [x for s in sets for x in ("--set", s)]
    env = thread_env(a.threads, MMPT_DEMO_DATA=str(data), MMPT_RUN_DIR=str(out))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # one rank, no launcher
        env.pop(k, None)
    log = work / f"mmpt-{tag}.log"
    wall, _ = run_logged(cmd, log, env, cwd=work)
    if steps:
        return None
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [r for r in recs if r.get("kind") == "train" and "samples_per_s" in r]
    if not train or train[-1]["step"] != a.steps:
        raise SystemExit(f"mmpt: expected logs up to step {a.steps}, got {[r['step'] for r in train]}")
    windows, waits, prev = [], [], 0
    for r in train:
        n = r["step"] - prev
        seconds = n * a.batch_size / r["samples_per_s"]
        windows.append((prev + 1, r["step"], seconds))
        waits.append((prev + 1, seconds, r.get("data_wait", 0.0) * seconds))
        prev = r["step"]
    rate = steady_rate(windows, a.skip_steps, a.batch_size)
    kept = [(s, w) for first, s, w in waits if first > a.skip_steps]
    params = re.search(r"([\d.]+) M params", log.read_text(errors="replace"))
    return {**rate, "wall_s": wall, "steps": train[-1]["step"],
            "data_wait_frac": sum(w for _, w in kept) / sum(s for s, _ in kept),
            "params_m": float(params.group(1)) if params else None, "log": str(log)}


def run_openclip(peer_py: Path, pattern: str, cfg_dir: Path, a, work: Path, tag: str,
                 steps: int | None = None) -> dict | None:
    """One OpenCLIP trainer run; ``steps`` set: an untimed warm-up run of that many steps (returns None)."""
    logs = work / f"oc-logs-{tag}"
    argv = ["--model", OC_MODEL_NAME, "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str((steps or a.steps) * a.batch_size), "--batch-size", str(a.batch_size),
            "--workers", str(a.workers), "--epochs", "1", "--lr", str(a.lr), "--warmup", str(a.warmup),
            "--wd", str(a.wd), "--lr-scheduler", "cosine", "--precision", "fp32", "--device", "cpu",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--logs", str(logs), "--name", "bench", "--log-every-n-steps", str(a.log_every),
            "--report-to", "", "--seed", "0"]
    if a.grad_clip:
        argv += ["--grad-clip-norm", str(a.grad_clip)]
    log = work / f"openclip-{tag}.log"
    wall, _ = run_logged([str(peer_py), "-c", OC_DRIVER, str(cfg_dir), *argv], log, thread_env(a.threads), cwd=work)
    if steps:
        return None
    out_log = logs / "bench" / "out.log"
    text = out_log.read_text(errors="replace") if out_log.exists() else log.read_text(errors="replace")
    windows, data_t, prev = [], [], 0
    for m in OC_LINE.finditer(text):
        end = int(m.group(2)) // a.batch_size
        n = end - prev
        if n <= 0:
            continue
        windows.append((prev + 1, end, float(m.group(5)) * n))
        data_t.append((prev + 1, float(m.group(4)) * n, float(m.group(5)) * n))
        prev = end
    if prev != a.steps:
        raise SystemExit(f"OpenCLIP: expected {a.steps} steps, its log ends at step {prev} "
                         f"\n--- {log} (tail) ---\n{text[-3000:]}")
    rate = steady_rate(windows, a.skip_steps, a.batch_size)
    kept = [(d, b) for first, d, b in data_t if first > a.skip_steps]
    return {**rate, "wall_s": wall, "steps": prev, "data_wait_frac": sum(d for d, _ in kept) / sum(b for _, b in kept),
            "log": str(out_log if out_log.exists() else log)}


def warm(peer_py: Path, data: Path, pattern: str, cfg_dir: Path, model, a, work: Path) -> None:
    """Untimed 2-step run of each tool first: file caches, and one-time JIT builds (DeepSpeed compiles its
    shm comm op into ~/.cache/torch_extensions on the first run after a change, ~30 s on 2 cores),
    must not land in either tool's measured wall time."""
    print("warm-up: 2 untimed steps of each tool", flush=True)
    run_mmpt(data, model, a, work, "warmup", steps=2)
    run_openclip(peer_py, pattern, cfg_dir, a, work, "warmup", steps=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per tool (default 60)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers, both tools")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS, both tools")
    add_model_args(p)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(10, steps // 5))")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay, both tools")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, both tools (0: none)")
    p.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="mmpt's shuffle buffer (OpenCLIP's trainer starts with 1000, grows to 5000)")
    p.add_argument("--log-every", type=int, default=None, help="log window in steps (default: max(1, steps // 20))")
    p.add_argument("--skip-frac", type=float, default=0.2, help="fraction of the first steps left out of steady state")
    p.add_argument("--train-samples", type=int, default=None,
                   help="demo training samples (default: max(8000, steps*batch + 2000), so that neither tool "
                        "starts a second pass over the shards, and its shuffle-buffer refill, inside the measurement)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per tool, alternating the order (mmpt first, then OpenCLIP first, ...); medians reported")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step warm-up run of each tool")
    p.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    p.add_argument("--keep-dirs", action="store_true", help="keep the temporary shards, run dirs and logs")
    a = p.parse_args()
    a.log_every = a.log_every or max(1, a.steps // 20)
    a.warmup = a.warmup if a.warmup is not None else min(10, max(1, a.steps // 5))
    a.skip_steps = math.ceil(a.skip_frac * a.steps)
    model = model_from_args(a)
    train_samples = a.train_samples or max(8000, math.ceil((a.steps * a.batch_size + 2000) / 1000) * 1000)

    peer_py = ensure_peer_env()  # before anything is timed; minutes on first use
    work = Path(tempfile.mkdtemp(prefix="mmpt-bench-train-"))
    try:
        print(f"work dir: {work}  (generating {train_samples} demo samples at {a.image_size} px)", flush=True)
        shards = demo_data(work / "data", train_samples, 16, a.image_size, a.threads)
        if len(shards["train"]) < a.workers:
            raise SystemExit(f"{len(shards['train'])} train shards < {a.workers} workers (OpenCLIP needs one each)")
        pattern = brace(shards["train"])
        cfg_dir = model.write_openclip_config(work / "oc-config")
        oc_params = int(subprocess.run([str(peer_py), "-c", PARAMS_OC, str(cfg_dir), OC_MODEL_NAME], check=True,
                                       capture_output=True, text=True, env=thread_env(a.threads)).stdout.split()[-1])
        if not a.no_warmup:
            warm(peer_py, work / "data", pattern, cfg_dir, model, a, work)
        runs: dict[str, list[dict]] = {"mmpt": [], "openclip": []}
        for i in range(a.repeats):
            order = ["mmpt", "openclip"] if i % 2 == 0 else ["openclip", "mmpt"]
            for tool in order:
                print(f"run {i + 1}/{a.repeats}: {tool} ({a.steps} steps of {a.batch_size})", flush=True)
                r = (run_mmpt(work / "data", model, a, work, str(i)) if tool == "mmpt"
                     else run_openclip(peer_py, pattern, cfg_dir, a, work, str(i)))
                print(f"  {r['samples_per_s']:.1f} samples/s steady, {r['wall_s']:.1f} s wall, "
                      f"data wait {100 * r['data_wait_frac']:.1f}%", flush=True)
                runs[tool].append(r)
        results = medians(runs, ("samples_per_s", "wall_s", "data_wait_frac"), a.keep_dirs)
        results["openclip"]["params_m"] = round(oc_params / 1e6, 2)
        results["mmpt"]["params_m"] = runs["mmpt"][0].get("params_m")
        settings = {"steps": a.steps, "batch_size": a.batch_size, "workers": a.workers, "threads": a.threads,
                    "precision": "fp32", "lr": a.lr, "warmup": a.warmup, "wd": a.wd, "grad_clip": a.grad_clip,
                    "log_every": a.log_every, "steady_from_step": a.skip_steps + 1, "train_samples": train_samples,
                    "repeats": a.repeats}
        report("train_throughput", "samples_per_s", "samples/s steady", results, a.out, settings, model,
               extra={"openclip_model_config": model.openclip_config(), "mmpt_overrides": model.mmpt_overrides(),
                      "peer_env": versions(), "wall_speed_ratio_mmpt_over_openclip":
                          results["openclip"]["wall_s"] / results["mmpt"]["wall_s"]})
        print(f"params: mmpt {results['mmpt']['params_m']} M, OpenCLIP {results['openclip']['params_m']} M; "
              f"data wait: mmpt {100 * results['mmpt']['data_wait_frac']:.1f}%, "
              f"OpenCLIP {100 * results['openclip']['data_wait_frac']:.1f}%")
    finally:
        if a.keep_dirs:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
