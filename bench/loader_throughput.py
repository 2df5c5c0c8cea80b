"""Data-loading throughput: mmpt's training loader vs OpenCLIP's ``get_wds_dataset``, DataLoader only.

Shards (generated once, untimed): ``--samples`` photo-like ``--source-size`` px JPEGs (default 384 px,
quality 95 as img2dataset writes them: a smooth colour field, 3-7 blurred shapes, a mid-frequency texture
and per-pixel noise; ~50 KB each, like web photos at that size) with captions of web length (5-30 words,
~12 on average), in shards of 512.

Both tools: training stream, ``--image-size`` (224) random-resized crops (scale 0.9-1.0, bicubic),
``--workers`` (2) DataLoader workers, ``--batch-size`` (128), captions tokenised by OpenCLIP's BPE at
context 77 inside the workers, each tool's default shuffle buffers. Nothing is done with the batches.

  mmpt:     ``mmpt.data.loader.train_loader`` on a config with ``image/vit`` (image_size) and
            ``text/transformer`` (context 77), as ``mmpt train`` builds it: uint8 pixels, ids + mask.
  OpenCLIP: ``open_clip_train.data.get_wds_dataset(args, image_transform(size, is_train=True),
            is_train=True, tokenizer=get_tokenizer("ViT-B-32"))`` in the peer venv (bench/peer_env.py),
            as its trainer calls it: normalised float pixels, ids.

samples/s counts the batches after each worker's first one (worker start and shuffle-buffer fill are
excluded) over the time since then; the whole loop (from creating the iterator) is reported too. Each
tool runs in its own process, ``--repeats`` times in alternating order; medians and their ratio go to
``bench/results/loader_throughput.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, main_python, run_logged, thread_env  # noqa: E402

SHARD_SIZE = 512
WORDS = ("a photo of the small large red blue green old new dog cat man woman child car house tree street city "
         "beach sunset mountain river table chair kitchen room garden flower bird boat train plane food plate "
         "coffee book phone computer white black wooden vintage modern beautiful view in on with at near and "
         "for sale stock image picture close up portrait landscape background texture pattern design art "
         "print poster shirt dress shoes bag logo icon vector illustration cartoon style night winter summer "
         "spring autumn snow rain sky cloud sun light dark colorful").split()

# One process per tool; each prints one BENCH line. Timestamps are taken as each batch arrives.
TIMED_LOOP = r"""
def timed(loader, batches, workers, batch_size, check):
    import time
    t0 = time.perf_counter()
    stamps, first = [], None
    for batch in loader:
        if first is None:
            first = check(batch)
        stamps.append(time.perf_counter())
        if len(stamps) == batches:
            break
    if len(stamps) < batches:
        raise SystemExit(f"loader ended after {len(stamps)} of {batches} batches")
    steady = (batches - workers) * batch_size / (stamps[-1] - stamps[workers - 1])
    return {"samples_per_s": steady, "whole_loop_samples_per_s": batches * batch_size / (stamps[-1] - t0),
            "first_batch_s": stamps[0] - t0, "loop_s": stamps[-1] - t0, "batches": batches, "first": first}
"""

MMPT_DRIVER = TIMED_LOOP + r"""
import json, sys
from mmpt.config import load_config
from mmpt.data.loader import train_loader
from mmpt.pretrainer import build_data_specs

pattern, size, batch, workers, batches = sys.argv[1], *map(int, sys.argv[2:6])
cfg = load_config({
    "name": "loader-bench", "seed": 0,
    "model": {"embed_dim": 32, "encoders": {
        "image": {"name": "image/vit", "image_size": size, "patch_size": 16, "width": 32, "depth": 1, "heads": 1},
        "text": {"name": "text/transformer", "context_length": 77, "width": 32, "depth": 1, "heads": 1}}},
    "objectives": {"clip": {"name": "clip", "pairs": [["image", "text"]]}},
    "data": {"sources": [pattern], "batch_size": batch, "workers": workers, "required": ["image", "text"]},
})
loader, _ = train_loader(cfg, build_data_specs(cfg), 0, 1)

def check(b):
    p, ids = b.fields["image"]["pixels"], b.fields["text"]["ids"]
    return {"pixels": [list(p.shape), str(p.dtype)], "ids": [list(ids.shape), str(ids.dtype)]}

print("BENCH " + json.dumps(timed(loader, batches, workers, batch, check)), flush=True)
"""

OPENCLIP_DRIVER = TIMED_LOOP + r"""
import json, sys
from types import SimpleNamespace
import open_clip
from open_clip_train.data import get_wds_dataset

pattern, size, batch, workers, batches = sys.argv[1], *map(int, sys.argv[2:6])
args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=batches * batch,
                       train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=workers, world_size=1)
preprocess = open_clip.image_transform(size, is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))

def check(b):
    images, ids = b
    return {"pixels": [list(images.shape), str(images.dtype)], "ids": [list(ids.shape), str(ids.dtype)]}

print("BENCH " + json.dumps(timed(data.dataloader, batches, workers, batch, check)), flush=True)
"""


def photo_like_jpeg(rng, side: int, noise_bank: list) -> bytes:
    """A ``side``-px JPEG (quality 95) with photo-like statistics: smooth colour field, shapes, texture, noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = (int(v) for v in rng.integers(-side // 4, side, 2))
        w, h = (int(v) for v in rng.integers(side // 10, side // 2, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.8))))
    texture = Image.fromarray(rng.integers(0, 256, (side // 8, side // 8), dtype=np.uint8)).resize(
        (side, side), Image.BILINEAR)
    noise = noise_bank[int(rng.integers(len(noise_bank)))]
    arr = (np.asarray(img, np.int16) + (np.asarray(texture, np.int16)[:, :, None] - 128) // 8
           + (noise * rng.uniform(0.5, 1.5)).astype(np.int16))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def caption(rng) -> bytes:
    n = int(min(30, max(5, rng.gamma(4.0, 3.0))))
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n)).encode()


def write_shards(folder: Path, samples: int, side: int) -> tuple[str, float]:
    """``folder/bench-{000000..N}.tar`` (brace pattern) and the mean JPEG size in KB."""
    import numpy as np

    rng = np.random.default_rng(0)
    noise_bank = [rng.normal(0, 5, (side, side, 3)).astype(np.float32) for _ in range(4)]
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-samples // SHARD_SIZE)
    total = 0
    for s in range(shards):
        with tarfile.open(folder / f"bench-{s:06d}.tar", "w") as tar:
            for i in range(s * SHARD_SIZE, min(samples, (s + 1) * SHARD_SIZE)):
                jpg = photo_like_jpeg(rng, side, noise_bank)
                total += len(jpg)
                for ext, data in (("jpg", jpg), ("txt", caption(rng))):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"bench-{{000000..{shards - 1:06d}}}.tar"), total / samples / 1024


def bench_line(log: Path) -> dict:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("BENCH ")]
    if not lines:
        raise SystemExit(f"no BENCH line in {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(lines[-1][6:])


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8192, help="samples in the generated shards (default 8192)")
    p.add_argument("--source-size", type=int, default=384, help="side of the generated JPEGs in pixels")
    p.add_argument("--image-size", type=int, default=224, help="training crop side in pixels")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both tools")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / MKL_NUM_THREADS, both tools")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating order")
    p.add_argument("--out", type=Path, default=RESULTS / "loader_throughput.json")
    p.add_argument("--keep-dirs", action="store_true", help="keep the shards and logs")
    a = p.parse_args()
    from peer_env import ensure_peer_env, versions

    peer = str(ensure_peer_env())
    # every worker's shard share must outlast the measurement in both tools (OpenCLIP's stream ends with them)
    per_worker = (a.samples // SHARD_SIZE // a.workers) * SHARD_SIZE // a.batch_size - 1
    batches = per_worker * a.workers
    if per_worker < 4:
        raise SystemExit(f"--samples {a.samples}: too few for {a.workers} workers x batch {a.batch_size}")
    work = Path(tempfile.mkdtemp(prefix="mmpt-bench-loader-"))
    try:
        print(f"work dir: {work}  (generating {a.samples} {a.source_size}-px JPEGs)", flush=True)
        pattern, kb = write_shards(work / "shards", a.samples, a.source_size)
        print(f"mean JPEG size {kb:.1f} KB; {batches} batches of {a.batch_size} per run", flush=True)
        drivers = {"mmpt": (main_python(), MMPT_DRIVER), "openclip": (peer, OPENCLIP_DRIVER)}
        runs: dict[str, list[dict]] = {"mmpt": [], "openclip": []}
        for i in range(a.repeats):
            for tool in (["mmpt", "openclip"] if i % 2 == 0 else ["openclip", "mmpt"]):
                python, code = drivers[tool]
                log = work / f"{tool}-{i}.log"
                wall, _ = run_logged([python, "-c", code, pattern, str(a.image_size), str(a.batch_size),
                                      str(a.workers), str(batches)], log, thread_env(a.threads), cwd=work)
                r = {**bench_line(log), "wall_s": wall}
                print(f"run {i + 1}/{a.repeats} {tool:8s}: {r['samples_per_s']:7.1f} samples/s "
                      f"(whole loop {r['whole_loop_samples_per_s']:.1f}, first batch {r['first_batch_s']:.2f} s) "
                      f"{r['first']}", flush=True)
                runs[tool].append(r)
        keys = ("samples_per_s", "whole_loop_samples_per_s", "first_batch_s", "wall_s")
        results = {t: {**{k: statistics.median(r[k] for r in rs) for k in keys}, "runs": rs} for t, rs in runs.items()}
        ratio = results["mmpt"]["samples_per_s"] / results["openclip"]["samples_per_s"]
        payload = {"benchmark": "loader_throughput",
                   "settings": {"samples": a.samples, "source_size": a.source_size, "mean_jpeg_kb": round(kb, 1),
                                "image_size": a.image_size, "batch_size": a.batch_size, "workers": a.workers,
                                "threads": a.threads, "batches_per_run": batches, "repeats": a.repeats,
                                "context_length": 77},
                   "results": results, "ratio_mmpt_over_openclip": ratio,
                   "ratio_whole_loop": results["mmpt"]["whole_loop_samples_per_s"]
                   / results["openclip"]["whole_loop_samples_per_s"],
                   "peer_versions": versions(), "machine": machine()}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(a.out)
        print(f"\nloader_throughput (median of {a.repeats}): mmpt {results['mmpt']['samples_per_s']:.1f}, "
              f"OpenCLIP {results['openclip']['samples_per_s']:.1f} samples/s; ratio {ratio:.3f} "
              f"(whole loop {payload['ratio_whole_loop']:.3f})\nresults: {a.out}")
    finally:
        if a.keep_dirs:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
