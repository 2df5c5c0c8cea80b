"""Embedding throughput: `mmpt embed` vs OpenCLIP's usual loop, in one run.

Same freshly generated demo shards (--images eval images), the same tiny CLIP architecture as
bench/train_throughput.py on CPU, the same batch size, data workers and thread count
(OMP_NUM_THREADS / MKL_NUM_THREADS); the runs go one after the other, never at the same time.

  mmpt:     `mmpt embed MODEL --data SHARDS --modality image --out DIR --dtype float32` on a model
            exported from a 2-step mmpt run (weights do not change the speed), as users get it (compute
            precision `auto`: bf16 on CPUs with native bfloat16, else fp32) and forced to fp32 (row
            `mmpt-fp32`, like for like with OpenCLIP's fp32 loop).
  OpenCLIP: in the main venv, `open_clip.create_model_and_transforms(<same config>, pretrained=None)`,
            a webdataset pipeline decoding the jpg with OpenCLIP's eval `preprocess`, a torch
            DataLoader with the same batch size and workers, `model.encode_image(x, normalize=True)`
            under `torch.no_grad()`, embeddings collected and saved as one .npy.

Two rates, each measured the same way for both tools:

  loop (the headline ratio): images / seconds from the first batch request to the last output written,
            timed inside each process: mmpt's own loop time (``EmbedSummary.seconds``: data loading,
            forward passes, writing the npy/parquet pair), OpenCLIP's loop + ``np.save``. Model loading
            and imports are outside it on both sides.
  command:  images / wall time of the whole command (process start, imports, model load, every image,
            output written). Also reported: the time after imports (model load + loop + write).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    main_python,
    medians,
    model_from_args,
    report,
    run_logged,
    thread_env,
)

# `mmpt embed ...` exactly as the console script runs it, with the post-import time printed
MMPT_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, mmpt, mmpt.commands.embed, mmpt.cli
t1 = time.perf_counter()
precision, summaries = sys.argv[1], []
_embed = mmpt.commands.embed.embed
def embed(*args, **kwargs):  # the CLI's own call, kept to read the loop time mmpt measures itself
    if precision != "default":  # embed(precision=...) until the CLI has a flag for it
        kwargs["precision"] = precision
    summary = _embed(*args, **kwargs)
    summaries.append(summary)
    return summary
mmpt.commands.embed.embed = embed
rc = mmpt.cli.main(sys.argv[2:])
resolved = mmpt.commands.embed.resolve_precision("auto" if precision == "default" else precision, torch.device("cpu"))
print("BENCH " + json.dumps({"import_s": t1 - t0, "run_s": time.perf_counter() - t1, "loop_s": summaries[-1].seconds,
                             "precision": resolved}), flush=True)
sys.exit(rc)
"""

OPENCLIP_LOOP = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch, open_clip, webdataset as wds
t1 = time.perf_counter()
cfg_dir, name, pattern, batch, workers, out = sys.argv[1:7]
open_clip.add_model_config(cfg_dir)
model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
model.eval()
ds = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg", "__key__").map_tuple(preprocess, None)
loader = torch.utils.data.DataLoader(ds, batch_size=int(batch), num_workers=int(workers))
keys, embs = [], []
t2 = time.perf_counter()
with torch.no_grad():
    for images, k in loader:
        embs.append(model.encode_image(images, normalize=True).numpy())
        keys.extend(k)
np.save(out, np.concatenate(embs))
t3 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "run_s": t3 - t1, "loop_s": t3 - t2, "images": len(keys)}),
      flush=True)
"""


def bench_line(log: Path) -> dict:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("BENCH ")]
    if not lines:
        raise SystemExit(f"no BENCH line in {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(lines[-1][6:])


def tiny_model(data: Path, model, a, work: Path) -> Path:
    """A 2-step mmpt run of the architecture, exported (untimed)."""
    run = work / "tiny-run"
    sets = model.mmpt_overrides() + [f"data.sources=[{data / 'train'}]", "data.batch_size=32", "data.workers=1",
                                     "train.steps=2", "train.log_every=1", "train.checkpoint_every=2",
                                     "train.progress=false", "train.eval_every=0", "train.precision=fp32",
                                     f"train.out_dir={run}"]
    env = thread_env(a.threads, MMPT_DEMO_DATA=str(data), MMPT_RUN_DIR=str(run))
    run_logged([str(MMPT), "train", "clip-tiny"] + [x for s in sets for x in ("--set", s)], work / "tiny-train.log",
               env, cwd=work)
    weights = work / "tiny.safetensors"
    run_logged([str(MMPT), "export", str(run), "--out", str(weights)], work / "tiny-export.log", env, cwd=work)
    return weights


def run_mmpt(weights: Path, pattern: str, a, work: Path, tag: str, precision: str) -> dict:
    out = work / f"mmpt-emb-{tag}"
    log = work / f"mmpt-embed-{tag}.log"
    wall, _ = run_logged([main_python(), "-c", MMPT_DRIVER, precision, "embed", str(weights), "--data", pattern,
                          "--modality", "image", "--out", str(out), "--batch-size", str(a.batch_size),
                          "--workers", str(a.workers), "--dtype", "float32"], log, thread_env(a.threads), cwd=work)
    inner = bench_line(log)
    import numpy as np

    images = sum(np.load(f, mmap_mode="r").shape[0] for f in sorted((out / "img_emb").glob("*.npy")))
    shutil.rmtree(out, ignore_errors=True)  # the next repeat must not resume from these
    return {"images": images, "wall_s": wall, "images_per_s": images / wall,
            "after_import_s": inner["run_s"], "after_import_images_per_s": images / inner["run_s"],
            "loop_s": inner["loop_s"], "loop_images_per_s": images / inner["loop_s"],
            "import_s": inner["import_s"], "precision": inner["precision"], "log": str(log)}


def run_openclip(cfg_dir: Path, pattern: str, a, work: Path, tag: str) -> dict:
    log = work / f"openclip-embed-{tag}.log"
    wall, _ = run_logged([main_python(), "-c", OPENCLIP_LOOP, str(cfg_dir), OC_MODEL_NAME, pattern,
                          str(a.batch_size), str(a.workers), str(work / f"oc-emb-{tag}.npy")],
                         log, thread_env(a.threads), cwd=work)
    inner = bench_line(log)
    images = inner["images"]
    return {"images": images, "wall_s": wall, "images_per_s": images / wall,
            "after_import_s": inner["run_s"], "after_import_images_per_s": images / inner["run_s"],
            "loop_s": inner["loop_s"], "loop_images_per_s": images / inner["loop_s"],
            "import_s": inner["import_s"], "log": str(log)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="eval images to embed (default 4000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers, both tools")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS, both tools")
    add_model_args(p)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per tool, alternating the order (mmpt first, then OpenCLIP first, ...); medians reported")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pass of each tool")
    p.add_argument("--out", type=Path, default=RESULTS / "embed_throughput.json")
    p.add_argument("--keep-dirs", action="store_true", help="keep the temporary shards, model, outputs and logs")
    a = p.parse_args()
    model = model_from_args(a)
    work = Path(tempfile.mkdtemp(prefix="mmpt-bench-embed-"))
    try:
        print(f"work dir: {work}  (generating {a.images} eval images at {a.image_size} px)", flush=True)
        data = work / "data"
        shards = demo_data(data, 500, a.images, a.image_size, a.threads)
        if len(shards["eval"]) < a.workers:
            print(f"note: {len(shards['eval'])} eval shards < {a.workers} workers: some workers idle in both tools")
        pattern = brace(shards["eval"])
        weights = tiny_model(data, model, a, work)
        cfg_dir = model.write_openclip_config(work / "oc-config")
        if not a.no_warmup:  # imports, file caches: untimed, both tools, on the first eval shard only
            print("warm-up: one untimed pass of each tool over one shard", flush=True)
            first = str(shards["eval"][0])
            run_logged([main_python(), "-c", MMPT_DRIVER, "default", "embed", str(weights), "--data", first,
                        "--modality",
                        "image", "--out", str(work / "warm-emb"), "--batch-size", str(a.batch_size), "--workers", "1"],
                       work / "warm-mmpt.log", thread_env(a.threads), cwd=work)
            run_logged([main_python(), "-c", OPENCLIP_LOOP, str(cfg_dir), OC_MODEL_NAME, first, str(a.batch_size), "1",
                        str(work / "warm-oc.npy")], work / "warm-oc.log", thread_env(a.threads), cwd=work)
        # mmpt as users get it (precision auto), mmpt forced to fp32 (like for like), OpenCLIP (fp32)
        tools = ["mmpt", "mmpt-fp32", "openclip"]
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for i in range(a.repeats):
            for tool in (tools if i % 2 == 0 else tools[::-1]):
                print(f"run {i + 1}/{a.repeats}: {tool}", flush=True)
                r = (run_openclip(cfg_dir, pattern, a, work, str(i)) if tool == "openclip"
                     else run_mmpt(weights, pattern, a, work, str(i), "default" if tool == "mmpt" else "fp32"))
                if r["images"] != a.images:
                    raise SystemExit(f"{tool} embedded {r['images']} images, expected {a.images}")
                print(f"  loop {r['loop_images_per_s']:.1f} images/s ({r['loop_s']:.1f} s), whole command "
                      f"{r['images_per_s']:.1f} images/s ({r['wall_s']:.1f} s), after imports "
                      f"{r['after_import_images_per_s']:.1f}", flush=True)
                runs[tool].append(r)
        results = medians(runs, ("loop_images_per_s", "loop_s", "images_per_s", "wall_s", "after_import_images_per_s",
                                 "after_import_s", "import_s"), a.keep_dirs)
        settings = {"images": a.images, "batch_size": a.batch_size, "workers": a.workers, "threads": a.threads,
                    "precision": f"mmpt {runs['mmpt'][0]['precision']} (auto), mmpt-fp32 fp32, openclip fp32",
                    "repeats": a.repeats}

        def ratio(key: str, tool: str = "mmpt") -> float:
            return results[tool][key] / results["openclip"][key]

        report("embed_throughput", "loop_images_per_s", "images/s (loop)", results, a.out, settings, model,
               extra={"ratio_loop": ratio("loop_images_per_s"), "ratio_command": ratio("images_per_s"),
                      "ratio_loop_fp32": ratio("loop_images_per_s", "mmpt-fp32"),
                      "ratio_command_fp32": ratio("images_per_s", "mmpt-fp32"),
                      "ratio_after_import": ratio("after_import_images_per_s"),
                      "openclip_model_config": model.openclip_config(), "mmpt_overrides": model.mmpt_overrides()})
        for key, what in (("images_per_s", "whole command"), ("after_import_images_per_s", "after imports")):
            print(f"{what}: mmpt {results['mmpt'][key]:.1f}, OpenCLIP {results['openclip'][key]:.1f} images/s, "
                  f"ratio {ratio(key):.3f}")
        print(f"mmpt forced to fp32: loop ratio {ratio('loop_images_per_s', 'mmpt-fp32'):.3f}, whole command "
              f"{ratio('images_per_s', 'mmpt-fp32'):.3f}")
    finally:
        if a.keep_dirs:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
