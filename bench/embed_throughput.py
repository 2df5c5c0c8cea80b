"""Embedding throughput: ``mmpt embed`` vs OpenCLIP's usual loop (webdataset + ``preprocess`` +
``encode_image``) on the same shards, the same architecture, batch size and data workers.

mmpt ships uint8 images from the workers and normalises on the batch; OpenCLIP's transform makes
float tensors per sample in the workers. Prints images/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, TinyClip, demo_shards, report, thread_env  # noqa: E402

OPENCLIP_LOOP = r"""
import json, sys, time, torch, open_clip, webdataset as wds
cfg_dir, pattern, batch, workers, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
open_clip.add_model_config(cfg_dir)
model, _, preprocess = open_clip.create_model_and_transforms("mmpt-bench-tiny", pretrained=None)
model.eval()
ds = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg").map_tuple(preprocess).batched(batch)
loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
t0 = time.perf_counter(); seen = 0
with torch.no_grad():
    for (images,) in loader:
        emb = model.encode_image(images, normalize=True)
        seen += images.shape[0]
print(json.dumps({"images": seen, "seconds": time.perf_counter() - t0}))
"""


def train_tiny(shards: list[Path], model: TinyClip, work: Path, threads: int) -> Path:
    """A two-step mmpt run of the same architecture, exported (weights do not matter for speed)."""
    out = work / "run"
    sets = model.mmpt_overrides() + [f"data.sources=[{'::'.join(map(str, shards))}]", "data.batch_size=32",
                                     "train.steps=2", "train.progress=false", f"train.out_dir={out}"]
    mmpt = str(ROOT / ".venv" / "bin" / "mmpt")
    env = thread_env(threads)
    subprocess.run([mmpt, "train", "clip-tiny"] + [x for s in sets for x in ("--set", s)], check=True, env=env,
                   capture_output=True)
    subprocess.run([mmpt, "export", str(out), "--out", str(work / "tiny.safetensors")], check=True, env=env,
                   capture_output=True)
    return work / "tiny.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed_throughput.json")
    a = p.parse_args()
    model = TinyClip()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from mmpt.data.demo import generate_demo

        info = generate_demo(work / "data", train_samples=500, eval_samples=a.images, image_size=model.image_size,
                             shard_size=1000, progress=False)
        weights = train_tiny(demo_shards(work / "small", 500, 10, model.image_size), model, work, a.threads)
        eval_pattern = info.eval_pattern
        t0 = time.perf_counter()
        proc = subprocess.run([str(ROOT / ".venv" / "bin" / "mmpt"), "embed", str(weights), "--data", eval_pattern,
                               "--modality", "image", "--out", str(work / "emb"), "--batch-size", str(a.batch_size),
                               "--workers", str(a.workers)], env=thread_env(a.threads), capture_output=True, text=True)
        mmpt_s = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        cfg_dir = work / "oc_cfg"
        cfg_dir.mkdir()
        (cfg_dir / "mmpt-bench-tiny.json").write_text(json.dumps(model.openclip_config()))
        t0 = time.perf_counter()
        oc = subprocess.run([sys.executable, "-c", OPENCLIP_LOOP, str(cfg_dir), eval_pattern, str(a.batch_size),
                             str(a.workers), str(a.images)], env=thread_env(a.threads), capture_output=True, text=True)
        oc_wall = time.perf_counter() - t0
        if oc.returncode:
            raise SystemExit(oc.stderr[-3000:])
        oc_loop = json.loads(oc.stdout.strip().splitlines()[-1])
    # both figures are wall time of the whole command (process start, model load, every image)
    results = {"mmpt": {"images_per_s": a.images / mmpt_s, "wall_s": mmpt_s},
               "openclip": {"images_per_s": a.images / oc_wall, "wall_s": oc_wall,
                            "loop_only_images_per_s": oc_loop["images"] / oc_loop["seconds"]}}
    report("embed_throughput", "images_per_s", results, a.out,
           {"images": a.images, "batch_size": a.batch_size, "workers": a.workers, "threads": a.threads}, model)
    print(f"(OpenCLIP's loop alone, without process start and model load: "
          f"{results['openclip']['loop_only_images_per_s']:.0f} images/s)")


if __name__ == "__main__":
    main()
