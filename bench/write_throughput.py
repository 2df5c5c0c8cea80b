"""``mmpt data write`` vs img2dataset-style sharding of local files: samples/s writing N small images.

The peer is the minimal equivalent of img2dataset's webdataset writer on files already on disk (img2dataset
itself only downloads URLs): read each image and its caption, write them with ``webdataset.TarWriter`` in
shards of ``--max-count``. Two peer variants: ``peer-raw`` stores the bytes unread (the lower bound on any
writer's cost) and ``peer-decode`` also decodes each image to learn its size, as img2dataset's resizer does
even with ``resize_mode=no``. mmpt decodes every image as its loader will (validation) in worker processes.

Each tool runs as its own command (a fresh interpreter: imports and start-up included), one after the
other, ``--repeats`` times in alternating order; medians, ratios mmpt/peer, settings and the machine's load
go to ``bench/results/write_throughput.json``.

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


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="mmpt's validation processes (default: CPU count)")
    ap.add_argument("--peer", nargs=3, metavar=("FOLDER", "PATTERN", "DECODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        peer(args.peer[0], args.peer[1], args.max_count, args.peer[2] == "1")
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images, args.size)
        commands = {
            "mmpt": lambda out: [sys.executable, "-m", "mmpt", "data", "write", str(folder), "--out", out,
                                 "--max-count", str(args.max_count)]
            + ([] if args.workers is None else ["--workers", str(args.workers)]),
            "peer-raw": lambda out: [sys.executable, __file__, "--max-count", str(args.max_count), "--peer",
                                     str(folder), out, "0"],
            "peer-decode": lambda out: [sys.executable, __file__, "--max-count", str(args.max_count), "--peer",
                                        str(folder), out, "1"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(args.repeats):
            order = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                times[name].append(timed(commands[name](str(out / "s-%06d.tar")), env))
                shutil.rmtree(out)
    rates = {name: args.images / statistics.median(t) for name, t in times.items()}
    result = {
        "what": "samples/s writing local images + captions to webdataset shards (end-to-end command, median)",
        "settings": {"images": args.images, "size": args.size, "max_count": args.max_count,
                     "repeats": args.repeats, "workers": args.workers or os.cpu_count()},
        "seconds": times, "samples_per_s": rates,
        "ratio_vs_peer_raw": rates["mmpt"] / rates["peer-raw"],
        "ratio_vs_peer_decode": rates["mmpt"] / rates["peer-decode"],
        "peer": "minimal img2dataset-style writer (read bytes + webdataset.TarWriter); img2dataset itself downloads "
                "URLs only",
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'tool':12s} {'samples/s':>10s} {'median s':>9s}")
    for name, t in times.items():
        print(f"{name:12s} {rates[name]:10.0f} {statistics.median(t):9.2f}")
    print(f"mmpt / peer-raw {result['ratio_vs_peer_raw']:.2f}, mmpt / peer-decode {result['ratio_vs_peer_decode']:.2f}")


if __name__ == "__main__":
    main()
