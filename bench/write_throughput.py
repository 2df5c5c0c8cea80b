"""``mmpt data write`` vs img2dataset-style sharding of local files: samples/s writing N small images.

The peer is the minimal equivalent of img2dataset's webdataset writer on files already on disk (img2dataset
itself only downloads URLs): read each image and its caption, write them with ``webdataset.TarWriter`` in
shards of ``--max-count``. Two peer variants: ``peer-raw`` stores the bytes unread (the lower bound on any
writer's cost) and ``peer-decode`` also decodes each image to learn its size, as img2dataset's resizer does
even with ``resize_mode=no``. mmpt decodes every image as its loader will (validation) in worker processes.

Each tool runs as its own command (a fresh interpreter), one after the other, ``--repeats`` times in
alternating order; each reports the seconds of the write alone (after its imports: mmpt's import torch), and
the whole command is timed too. Medians, ratios mmpt/peer for both, settings and the machine's load go to
``bench/results/write_throughput.json``.

    .venv/bin/python bench/write_throughput.py [--images 10000] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "write_throughput.json"


def make_images(folder: Path, n: int, size: int) -> None:
    """``n`` JPEGs of ``size`` px (random coloured blocks, so they compress like photos a little) + captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:06d}.txt").write_text(f"picture number {i}")


def peer(folder: str, pattern: str, max_count: int, decode: bool) -> None:
    """img2dataset-style: read image + caption, (decode for the size,) ``webdataset.TarWriter`` per shard."""
    import webdataset as wds

    images = sorted(p for p in Path(folder).iterdir() if p.suffix == ".jpg")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    writer, shard = None, 0
    for i, path in enumerate(images):
        if i % max_count == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(pattern % shard)
            shard += 1
        data = path.read_bytes()
        sample = {"__key__": f"{i:09d}", "jpg": data, "txt": path.with_suffix(".txt").read_text()}
        if decode:
            from PIL import Image

            img = Image.open(io.BytesIO(data))
            img.load()
            sample["json"] = json.dumps({"width": img.width, "height": img.height})
        writer.write(sample)
    if writer is not None:
        writer.close()


def run_tool(tool: str, folder: str, pattern: str, max_count: int) -> None:
    """One measured run in this (fresh) interpreter: imports first, then the timed write; prints its seconds."""
    if tool.startswith("mmpt"):
        from mmpt.data.sources import data_sides
        from mmpt.data.writer import write_shards

        data_sides()  # registers and builds every data side, as the command does before writing
        workers = {"mmpt-w0": 0, "mmpt-w2": 2}.get(tool)
        start = time.perf_counter()
        write_shards(folder, pattern, max_count=max_count, workers=workers, progress=False)
    else:
        import webdataset  # noqa: F401
        from PIL import Image  # noqa: F401

        start = time.perf_counter()
        peer(folder, pattern, max_count, decode=tool == "peer-decode")
    print(json.dumps({"work_s": time.perf_counter() - start}))


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds of its write alone)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed, json.loads(done.stdout.strip().splitlines()[-1])["work_s"]


TOOLS = ("mmpt", "mmpt-w0", "mmpt-w2", "peer-raw", "peer-decode")
MMPT = TOOLS[:3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", nargs=3, metavar=("TOOL", "FOLDER", "PATTERN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run_tool(args.run[0], args.run[1], args.run[2], args.max_count)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall: dict[str, list[float]] = {t: [] for t in TOOLS}
    work: dict[str, list[float]] = {t: [] for t in TOOLS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images, args.size)
        for r in range(args.repeats):
            for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                out = Path(tmp) / f"{tool}-{r}"
                argv = [sys.executable, __file__, "--max-count", str(args.max_count), "--run", tool, str(folder),
                        str(out / "s-%06d.tar")]
                w, k = timed(argv, env)
                wall[tool].append(w)
                work[tool].append(k)
                shutil.rmtree(out)
    rate = {t: args.images / statistics.median(v) for t, v in work.items()}
    rate_wall = {t: args.images / statistics.median(v) for t, v in wall.items()}
    result = {
        "what": "samples/s writing N local JPEGs + captions to webdataset shards; work = the write alone in a fresh "
                "interpreter after its imports, wall = the whole command; medians",
        "peer": "img2dataset-style writer on local files (read bytes + webdataset.TarWriter; peer-decode also "
                "decodes each image for its size as img2dataset's resizer does); img2dataset itself only downloads "
                "URLs, so the equivalent minimal writer was run",
        "mmpt": "mmpt data write (write_shards): every image decoded as the loader will, under its byte budget; "
                "'mmpt' with its default worker processes (CPUs - 1: none on 2 CPUs), 'mmpt-w0' in-process, "
                "'mmpt-w2' with 2",
        "settings": {"images": args.images, "size": args.size, "max_count": args.max_count, "repeats": args.repeats,
                     "threads": 1},
        "work_s": work, "wall_s": wall, "samples_per_s": rate, "samples_per_s_wall": rate_wall,
        "ratio_vs_peer_raw": {t: rate[t] / rate["peer-raw"] for t in MMPT},
        "ratio_vs_peer_decode": {t: rate[t] / rate["peer-decode"] for t in MMPT},
        "ratio_wall_vs_peer_raw": {t: rate_wall[t] / rate_wall["peer-raw"] for t in MMPT},
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'tool':12s} {'work/s':>9s} {'wall/s':>9s}   (samples per second, medians of {args.repeats})")
    for t in TOOLS:
        print(f"{t:12s} {rate[t]:9.0f} {rate_wall[t]:9.0f}")
    for t in MMPT:
        print(f"{t} / peer-raw: work {result['ratio_vs_peer_raw'][t]:.2f}, wall "
              f"{result['ratio_wall_vs_peer_raw'][t]:.2f}; / peer-decode: work {result['ratio_vs_peer_decode'][t]:.2f}")


if __name__ == "__main__":
    main()
