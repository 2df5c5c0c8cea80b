"""Training throughput: mmpt vs OpenCLIP's own trainer (open_clip_train), in one run.

Both tools train the same tiny CLIP (ViT with a patch stem and CLS pooling + causal text tower with
EOT pooling, equal widths / depths / heads, linear projections) on the same freshly generated demo
shards, at fp32 and bf16 (--precision; OpenCLIP amp_bf16) on CPU by default (--device cuda for GPUs), one process, with the same batch size, step count, data workers, thread count
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
Each run also reports achieved FLOP/s over the matmul peak of its own process (bench/flops.py).

Two configurations by default (--configs), each run --repeats times per tool in alternating order
(median, min and max reported, and the ratio of the medians per configuration):
  ctx32-demo  text context 32, the demo captions as generated (about 10 real tokens of 32);
  ctx77-web   OpenCLIP's usual context of 77, every demo caption lengthened with web alt-text filler
              clauses ("stock photo", "vector illustration for your project", ...) to a token count
              (start and end tokens included) drawn from a log-normal with median 18 and sigma 0.55, a
              web-caption-like length distribution; whole clauses overshoot the target a little: measured
              mean ~23, median 20, 90th percentile 39, 0.3% cut at 77 (the JSON's "captions" has each run's).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OC_MODEL_NAME,
    RESULTS,
    add_model_args,
    brace,
    demo_data,
    machine,
    main_python,
    medians,
    model_from_args,
    run_logged,
    steady_rate,
    thread_env,
)
from flops import MMPT_DRIVER, OPENCLIP_DRIVER, peak_share  # noqa: E402
from peer_env import ensure_peer_env, versions  # noqa: E402

# OpenCLIP 3.3, open_clip_train/train.py:
# "Train Epoch: 0 [ 640/3840 (17%)] Data (t): 0.004 Batch (t): 0.712, 89.9/s, 89.9/s/gpu LR: ..."
# Data (t) / Batch (t) are averages over the window since the previous line; the "/s" figure is
# the last step alone, so the window averages are used here.
OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")

PARAMS_OC = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
             "m = open_clip.create_model(sys.argv[2], pretrained=None); "
             "print(sum(p.numel() for p in m.parameters()))")


# Web alt-text padding for the ctx77-web captions (see the module docstring).
FILLERS = ("stock photo", "high resolution image", "isolated on a plain backdrop", "simple flat design",
           "vector illustration for your project", "royalty free clip art", "minimalist icon", "digital art",
           "shown in close up", "printed on a poster", "free download for personal use", "with soft lighting",
           "great for presentations and websites", "modern graphic element", "centered composition",
           "bright and clean colors", "part of a larger collection of shapes", "high quality png",
           "drawn by hand", "seen from the front")
WEB_MEDIAN_TOKENS, WEB_SIGMA = 18, 0.55


def token_count(texts: list[str]) -> list[int]:
    """BPE tokens of each text with start and end tokens, uncut."""
    from mmpt.nn.tokenizers import build_tokenizer

    return build_tokenizer("openclip-bpe", 1024).encode(texts)[1].sum(1).tolist()


def web_caption(caption: str, rng, filler_tokens: dict[str, int]) -> str:
    """``caption`` plus filler clauses up to a log-normal token count (BPE splits at ', ', so counts add)."""
    target = round(rng.lognormal(math.log(WEB_MEDIAN_TOKENS), WEB_SIGMA))
    n = token_count([caption])[0]
    while n < target:
        clause = FILLERS[rng.integers(len(FILLERS))]
        caption, n = f"{caption}, {clause}", n + filler_tokens[clause]
    return caption


def web_shards(shards: list[Path], out: Path, seed: int = 0) -> list[Path]:
    """Copies of ``shards`` whose ``txt`` members are lengthened to web-caption lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    filler_tokens = dict(zip(FILLERS, (n - 2 for n in token_count([", " + f for f in FILLERS])), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in shards:
        with tarfile.open(shard) as src, tarfile.open(out / shard.name, "w") as dst:
            for info in src:
                data = src.extractfile(info).read() if info.isfile() else None
                if info.name.endswith(".txt"):
                    lines = data.decode("utf-8").splitlines()
                    data = "\n".join(web_caption(x, rng, filler_tokens) for x in lines).encode("utf-8")
                    info.size = len(data)
                dst.addfile(info, io.BytesIO(data) if data is not None else None)
        written.append(out / shard.name)
    return written


def caption_stats(shards: list[Path], ctx: int, batch: int) -> dict:
    """Real tokens per caption (first line, as cut to ``ctx``) and the mean longest one per batch in
    shard order: the text width mmpt's trimmed batches run at (the shuffle buffer mixes, the mean holds)."""
    texts = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            texts += [tar.extractfile(i).read().decode("utf-8").splitlines()[0] for i in tar if i.name.endswith(".txt")]
    lengths = [min(n, ctx) for n in token_count(texts)]
    q = statistics.quantiles(lengths, n=100)
    longest = [max(lengths[i:i + batch]) for i in range(0, len(lengths) - batch + 1, batch)]
    return {"context": ctx, "captions": len(lengths), "mean_tokens": round(statistics.fmean(lengths), 2),
            "median_tokens": statistics.median(lengths), "p90_tokens": q[89], "p99_tokens": q[98],
            "cut_at_context_frac": round(sum(n >= ctx for n in lengths) / len(lengths), 4),
            "mean_longest_per_batch": round(statistics.fmean(longest), 2)}


# mmpt's train.precision -> OpenCLIP trainer's --precision for the same arithmetic (bf16 autocast).
OC_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def run_mmpt(data: Path, model, a, work: Path, tag: str, precision: str, steps: int | None = None,
             train_dir: Path | None = None) -> dict | None:
    """One mmpt training run (``bench/flops.py``'s driver around ``mmpt train``: matmul peak before, step FLOPs
    after); ``steps`` set: an untimed warm-up run of that many steps (returns None)."""
    out = work / f"mmpt-{tag}"
    n_steps = steps or a.steps
    sets = model.mmpt_overrides() + [
        f"data.sources=[{train_dir or data / 'train'}]", f"data.batch_size={a.batch_size}", f"data.workers={a.workers}",
        f"data.shuffle_buffer={a.shuffle_buffer}", f"train.steps={n_steps}", f"train.log_every={a.log_every}",
        f"train.checkpoint_every={n_steps}", "train.eval_every=0", "train.progress=false", "train.zero_stage=0",
        f"train.precision={precision}", "train.grad_accum=1", f"train.grad_clip={a.grad_clip}", f"train.out_dir={out}",
        f"optim.lr={a.lr}", f"optim.warmup_steps={a.warmup}", f"optim.weight_decay={a.wd}", "optim.schedule=cosine"]
    probe_path = work / f"probe-mmpt-{tag}.json"
    cmd = [main_python(), "-c", MMPT_DRIVER, str(probe_path), precision, str(Path(__file__).parent), "clip-tiny",
           str(len(sets)), *sets, "train", "clip-tiny"] + [x for s in sets for x in ("--set", s)]
    env = thread_env(a.threads, MMPT_DEMO_DATA=str(data), MMPT_RUN_DIR=str(out),
                     **({"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}))  # mmpt takes a GPU when it sees one
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
    probe = json.loads(probe_path.read_text())
    return {**rate, "wall_s": wall - probe["probe_s"], "probe": probe, "steps": train[-1]["step"],
            "data_wait_frac": sum(w for _, w in kept) / sum(s for s, _ in kept),
            "params_m": float(params.group(1)) if params else None, "log": str(log)}


def run_openclip(peer_py: Path, pattern: str, cfg_dir: Path, a, work: Path, tag: str, precision: str,
                 steps: int | None = None) -> dict | None:
    """One OpenCLIP trainer run (``bench/flops.py``'s driver: matmul peak before, step FLOPs after); ``steps``
    set: an untimed warm-up run of that many steps (returns None)."""
    logs = work / f"oc-logs-{tag}"
    argv = ["--model", OC_MODEL_NAME, "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str((steps or a.steps) * a.batch_size), "--batch-size", str(a.batch_size),
            "--workers", str(a.workers), "--epochs", "1", "--lr", str(a.lr), "--warmup", str(a.warmup),
            "--wd", str(a.wd), "--lr-scheduler", "cosine", "--precision", OC_PRECISION[precision],
            "--device", a.device,
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--logs", str(logs), "--name", "bench", "--log-every-n-steps", str(a.log_every),
            "--report-to", "", "--seed", "0"]
    if a.grad_clip:
        argv += ["--grad-clip-norm", str(a.grad_clip)]
    log = work / f"openclip-{tag}.log"
    probe_path = work / f"probe-openclip-{tag}.json"
    driver = [str(peer_py), "-c", OPENCLIP_DRIVER, str(probe_path), precision, str(Path(__file__).parent), str(cfg_dir),
              OC_MODEL_NAME, str(a.batch_size), OC_PRECISION[precision]]
    wall, _ = run_logged([*driver, *argv], log, thread_env(a.threads), cwd=work)
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
    probe = json.loads(probe_path.read_text())
    return {**rate, "wall_s": wall - probe["probe_s"], "probe": probe, "steps": prev, "data_wait_frac": sum(d for d, _ in kept) / sum(b for _, b in kept),
            "log": str(out_log if out_log.exists() else log)}


def warm(peer_py: Path, data: Path, pattern: str, cfg_dir: Path, model, a, work: Path) -> None:
    """Untimed 2-step run of each tool first: file caches, and one-time JIT builds (DeepSpeed compiles its
    shm comm op into ~/.cache/torch_extensions on the first run after a change, ~30 s on 2 cores),
    must not land in either tool's measured wall time."""
    print("warm-up: 2 untimed steps of each tool", flush=True)
    for precision in a.precisions:
        run_mmpt(data, model, a, work, f"warmup-{precision}", precision, steps=2)
        run_openclip(peer_py, pattern, cfg_dir, a, work, f"warmup-{precision}", precision, steps=2)


@dataclasses.dataclass
class Setup:
    """One measured configuration: its model, its training shards and their caption statistics."""

    name: str
    model: object
    precision: str
    train: list[Path]
    cfg_dir: Path
    captions: dict


def parse_configs(text: str) -> list[tuple[int, str]]:
    """'32:demo,77:web' -> [(32, 'demo'), (77, 'web')]."""
    out = []
    for item in text.split(","):
        ctx, _, kind = item.strip().partition(":")
        if not ctx.isdigit() or kind not in ("demo", "web"):
            raise SystemExit(f"--configs: {item!r} is not CONTEXT:demo or CONTEXT:web")
        out.append((int(ctx), kind))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers, both tools")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS, both tools")
    add_model_args(p)
    p.add_argument("--configs", default="32:demo,77:web",
                   help="CONTEXT:CAPTIONS list; captions 'demo' (as generated) or 'web' (lengthened, see above); "
                        "--ctx is ignored when given here (default 32:demo,77:web)")
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
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per tool and configuration, alternating the order (mmpt first, then OpenCLIP first, "
                        "...); median, min and max reported (default 3)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step warm-up run of each tool")
    p.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    p.add_argument("--keep-dirs", action="store_true", help="keep the temporary shards, run dirs and logs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both tools train (default cpu)")
    p.add_argument("--precision", default="fp32,bf16",
                   help="comma list of fp32|bf16: mmpt train.precision, OpenCLIP the matching --precision (bf16: "
                        "amp_bf16); each context runs at each (default fp32,bf16)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    a = p.parse_args()
    a.precisions = [x.strip() for x in a.precision.split(",") if x.strip()]
    if not a.precisions or any(x not in OC_PRECISION for x in a.precisions):
        raise SystemExit(f"--precision {a.precision}: expected a comma list of {', '.join(OC_PRECISION)}")
    if a.dry_run:
        print(f"train_throughput: {a.device} {','.join(a.precisions)}, {a.steps} steps of {a.batch_size}, configs {a.configs}, "
              f"model {model_from_args(a)}, {a.repeats} repeat(s) -> {a.out}")
        return
    a.log_every = a.log_every or max(1, a.steps // 20)
    a.warmup = a.warmup if a.warmup is not None else min(10, max(1, a.steps // 5))
    a.skip_steps = math.ceil(a.skip_frac * a.steps)
    configs = parse_configs(a.configs)
    base = model_from_args(a)
    train_samples = a.train_samples or max(8000, math.ceil((a.steps * a.batch_size + 2000) / 1000) * 1000)

    peer_py = ensure_peer_env()  # before anything is timed; minutes on first use
    work = Path(tempfile.mkdtemp(prefix="mmpt-bench-train-"))
    try:
        print(f"work dir: {work}  (generating {train_samples} demo samples at {a.image_size} px)", flush=True)
        shards = demo_data(work / "data", train_samples, 16, a.image_size, a.threads)
        if len(shards["train"]) < a.workers:
            raise SystemExit(f"{len(shards['train'])} train shards < {a.workers} workers (OpenCLIP needs one each)")
        setups = []
        for ctx, kind in configs:
            train = shards["train"] if kind == "demo" else web_shards(shards["train"], work / "data-web" / "train")
            model = dataclasses.replace(base, ctx=ctx)
            cfg_dir, captions = model.write_openclip_config(work / f"oc-config-ctx{ctx}-{kind}"), caption_stats(train, ctx, a.batch_size)
            print(f"ctx{ctx}-{kind}: captions {captions}", flush=True)
            setups += [Setup(f"ctx{ctx}-{kind}-{prec}", model, prec, train, cfg_dir, captions) for prec in a.precisions]
        oc_params = {s.name: int(subprocess.run(
            [str(peer_py), "-c", PARAMS_OC, str(s.cfg_dir), OC_MODEL_NAME], check=True, capture_output=True,
            text=True, env=thread_env(a.threads)).stdout.split()[-1]) for s in setups}
        if not a.no_warmup:
            first = setups[0]
            warm(peer_py, work / "data", brace(first.train), first.cfg_dir, first.model, a, work)
        runs = {s.name: {"mmpt": [], "openclip": []} for s in setups}
        for i in range(a.repeats):
            order = ["mmpt", "openclip"] if i % 2 == 0 else ["openclip", "mmpt"]
            for s in setups:
                for tool in order:
                    tag = f"{s.name}-{i}"
                    print(f"run {i + 1}/{a.repeats} {s.name}: {tool} ({a.steps} steps of {a.batch_size})", flush=True)
                    r = (run_mmpt(work / "data", s.model, a, work, tag, s.precision, train_dir=s.train[0].parent)
                         if tool == "mmpt" else run_openclip(peer_py, brace(s.train), s.cfg_dir, a, work, tag, s.precision))
                    print(f"  {r['samples_per_s']:.1f} samples/s steady, {r['wall_s']:.1f} s wall, "
                          f"data wait {100 * r['data_wait_frac']:.1f}%, peak {r['probe']['peak_flops'] / 1e9:.0f} "
                          f"GFLOP/s, {r['probe']['flops_per_sample'] / 1e9:.3f} GFLOP/sample", flush=True)
                    runs[s.name][tool].append(r)
        settings = {"steps": a.steps, "batch_size": a.batch_size, "workers": a.workers, "threads": a.threads,
                    "precisions": a.precisions, "device": a.device, "lr": a.lr, "warmup": a.warmup, "wd": a.wd, "grad_clip": a.grad_clip,
                    "log_every": a.log_every, "steady_from_step": a.skip_steps + 1, "train_samples": train_samples,
                    "repeats": a.repeats, "order": "alternating per repeat (mmpt first on odd repeats)"}
        report(setups, runs, oc_params, settings, a)
    finally:
        if a.keep_dirs:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(setups: list[Setup], runs: dict, oc_params: dict, settings: dict, a) -> None:
    """Print one table per configuration with the ratio of the medians, and write the JSON."""
    keys = ("samples_per_s", "wall_s", "data_wait_frac", "peak_flops", "achieved_flops", "peak_fraction",
            "model_peak_fraction")
    configs = {}
    print()
    print(f"train_throughput  ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    for s in setups:
        # one work unit for both tools: OpenCLIP's FLOPs per sample (the full context it always runs)
        unit = statistics.median(r["probe"]["flops_per_sample"] for r in runs[s.name]["openclip"])
        for rs in runs[s.name].values():
            for r in rs:
                r.update(peak_share(r, r["probe"], unit))
        res = medians(runs[s.name], keys, a.keep_dirs)
        res["openclip"]["params_m"] = round(oc_params[s.name] / 1e6, 2)
        res["mmpt"]["params_m"] = runs[s.name]["mmpt"][0].get("params_m")
        ratio = res["mmpt"]["samples_per_s"] / res["openclip"]["samples_per_s"]
        m_lo, m_hi = res["mmpt"]["spread"]["samples_per_s"]
        o_lo, o_hi = res["openclip"]["spread"]["samples_per_s"]
        configs[s.name] = {"model": dataclasses.asdict(s.model), "precision": s.precision, "captions": s.captions,
                           "openclip_model_config": s.model.openclip_config(),
                           "mmpt_overrides": s.model.mmpt_overrides(), "results": res,
                           "ratio_mmpt_over_openclip": ratio, "ratio_range": [m_lo / o_hi, m_hi / o_lo],
                           "wall_speed_ratio_mmpt_over_openclip": res["openclip"]["wall_s"] / res["mmpt"]["wall_s"]}
        print(f"\n{s.name}: context {s.model.ctx}, {s.precision}, captions mean {s.captions['mean_tokens']} tokens, "
              f"longest per batch {s.captions['mean_longest_per_batch']} (mean)")
        print(f"{'tool':10s} {'samples/s median':>17s} {'[min, max]':>16s} {'wall s':>8s} {'data wait':>10s} "
              f"{'peak GFLOP/s':>13s} {'of peak':>8s} {'model/peak':>11s}")
        for tool, v in res.items():
            lo, hi = v["spread"]["samples_per_s"]
            print(f"{tool:10s} {v['samples_per_s']:17.1f} {f'[{lo:.1f}, {hi:.1f}]':>16s} {v['wall_s']:8.1f} "
                  f"{100 * v['data_wait_frac']:9.1f}% {v['peak_flops'] / 1e9:13.0f} {100 * v['peak_fraction']:7.1f}% "
                  f"{100 * v['model_peak_fraction']:10.1f}%")
        print(f"ratio mmpt/OpenCLIP (median samples/s): {ratio:.3f}  (range {m_lo / o_hi:.3f}-{m_hi / o_lo:.3f}); "
              f"params mmpt {res['mmpt']['params_m']} M, OpenCLIP {res['openclip']['params_m']} M")
    payload = {"benchmark": "train_throughput", "settings": settings, "configurations": configs,
               "ratio_mmpt_over_openclip": {k: v["ratio_mmpt_over_openclip"] for k, v in configs.items()},
               "peer_env": versions(), "machine": machine()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
