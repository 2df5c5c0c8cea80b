"""Training throughput: mmpt vs OpenCLIP's own trainer, same tiny CLIP, shards, batch and steps.

Both run one after the other in this process's machine state, fp32 on CPU, one rank, the same
thread count and data workers. Steady-state samples/s comes from each tool's own log after the
first 20% of steps; wall time (start-up included) is reported too. Prints the ratio mmpt/OpenCLIP.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, TinyClip, demo_shards, peer_python, report, thread_env  # noqa: E402


def run_mmpt(shards: list[Path], model: TinyClip, a: argparse.Namespace, work: Path) -> dict:
    out = work / "mmpt"
    sets = model.mmpt_overrides() + [
        f"data.sources=[{'::'.join(map(str, shards))}]", f"data.batch_size={a.batch_size}", f"data.workers={a.workers}",
        "data.shuffle_buffer=1000", f"train.steps={a.steps}", f"train.log_every={max(1, a.steps // 20)}",
        f"train.checkpoint_every={a.steps}", "train.progress=false", f"train.out_dir={out}", "optim.lr=5e-4",
        "optim.warmup_steps=10"]
    cmd = [str(ROOT / ".venv" / "bin" / "mmpt"), "train", "clip-tiny"] + [x for s in sets for x in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=thread_env(a.threads), capture_output=not a.verbose)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    rates = [r["samples_per_s"] for r in recs if r["kind"] == "train" and r["step"] > a.steps * 0.2]
    return {"samples_per_s": sum(rates) / len(rates), "wall_s": wall}


def run_openclip(shards: list[Path], model: TinyClip, a: argparse.Namespace, work: Path) -> dict:
    cfg_dir = work / "oc_cfg"
    cfg_dir.mkdir()
    (cfg_dir / "mmpt-bench-tiny.json").write_text(json.dumps(model.openclip_config()))
    first, last = shards[0].stem.split("-")[-1], shards[-1].stem.split("-")[-1]
    pattern = str(shards[0].parent / f"demo-train-{{{first}..{last}}}.tar")
    argv = ["--model", "mmpt-bench-tiny", "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str(a.steps * a.batch_size), "--batch-size", str(a.batch_size),
            "--workers", str(a.workers), "--epochs", "1", "--lr", "5e-4", "--warmup", "10", "--precision", "fp32",
            "--device", "cpu", "--save-frequency", "0", "--logs", str(work / "oc_logs"), "--name", "bench",
            "--log-every-n-steps", str(max(1, a.steps // 20)), "--report-to", "", "--seed", "0"]
    code = (f"import open_clip, sys; open_clip.add_model_config({str(cfg_dir)!r}); "
            f"from open_clip_train.main import main; main({argv!r})")
    t0 = time.perf_counter()
    proc = subprocess.run([str(peer_python()), "-c", code], env=thread_env(a.threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"OpenCLIP trainer failed:\n{log[-4000:]}")
    steps = [(int(m.group(1)), float(m.group(2))) for m in
             re.finditer(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): [\d.]+, ([\d.]+)/s", log)]
    rates = [r for seen, r in steps if seen > 0.2 * a.steps * a.batch_size]
    if not rates:
        raise SystemExit(f"no throughput lines in OpenCLIP's log:\n{log[-3000:]}")
    return {"samples_per_s": sum(rates) / len(rates), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    model = TinyClip()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = demo_shards(work / "data", max(4000, a.steps * a.batch_size // 2), 100, model.image_size)
        peer_python()  # set up before timing anything
        results = {"mmpt": run_mmpt(shards, model, a, work), "openclip": run_openclip(shards, model, a, work)}
    report("train_throughput", "samples_per_s", results, a.out,
           {"steps": a.steps, "batch_size": a.batch_size, "workers": a.workers, "threads": a.threads}, model)


if __name__ == "__main__":
    main()
