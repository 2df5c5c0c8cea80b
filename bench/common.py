"""Shared pieces of the benchmarks: the tiny CLIP both tools train, demo shards, the peer env."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / ".peer-venv"


@dataclass
class TinyClip:
    """One tiny CLIP, written as an OpenCLIP model config and as mmpt overrides (same architecture:
    patch stem, CLS pooling, causal text with EOT pooling, linear projections)."""

    image_size: int = 64
    patch: int = 8
    width: int = 192
    layers: int = 4
    heads: int = 3
    ctx: int = 32
    embed_dim: int = 128

    def openclip_config(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.layers, "width": self.width,
                               "patch_size": self.patch, "head_width": self.width // self.heads},
                "text_cfg": {"context_length": self.ctx, "vocab_size": 49408, "width": self.width,
                             "heads": self.heads, "layers": self.layers}}

    def mmpt_overrides(self) -> list[str]:
        vit = (f"{{name: image/vit, image_size: {self.image_size}, patch_size: {self.patch}, width: {self.width}, "
               f"depth: {self.layers}, heads: {self.heads}, stem: patch, pool: cls}}")
        txt = (f"{{name: text/transformer, context_length: {self.ctx}, width: {self.width}, depth: {self.layers}, "
               f"heads: {self.heads}, causal: true, pool: eot}}")
        return [f"model.embed_dim={self.embed_dim}", f"model.encoders.image={vit}", f"model.encoders.text={txt}"]


def thread_env(threads: int) -> dict[str, str]:
    """The same thread settings for every measured process."""
    n = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONUNBUFFERED": "1"}


def demo_shards(out: Path, train: int, eval_: int, image_size: int) -> list[Path]:
    """Generate the demo set once into ``out``; returns the train shards."""
    from mmpt.data.demo import generate_demo

    info = generate_demo(out, train_samples=train, eval_samples=eval_, image_size=image_size,
                         shard_size=1000, progress=False)
    return list(info.train_shards)


def peer_python() -> Path:
    """OpenCLIP's trainer needs webdataset 0.2.86 and pandas, which conflict with mmpt's webdataset 1.0:
    a peer venv holds just those and sees everything else (the same torch build) from mmpt's venv."""
    py = PEER / "bin" / "python"
    stamp = PEER / ".ready"
    if stamp.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    main_site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    # a .pth entry appends mmpt's site-packages *after* the peer's own, so webdataset 0.2.86 wins
    Path(site, "zz_mmpt_main.pth").write_text(main_site + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "webdataset==0.2.86", "pandas"], check=True)
    stamp.write_text(time.ctime())
    return py


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(path: Path, payload: dict) -> None:
    """JSON result with the config dataclasses expanded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                for k, v in payload.items()}, indent=1))
    print(f"results: {path}")


def report(name: str, rate: str, results: dict, out: Path, settings: dict, model: TinyClip) -> float:
    """Print the table and the ratio mmpt/OpenCLIP of ``rate``, write the JSON; returns the ratio."""
    ratio = results["mmpt"][rate] / results["openclip"][rate]
    print(f"{'tool':10s} {rate:>14s} {'wall s':>8s}")
    for k, v in results.items():
        print(f"{k:10s} {v[rate]:14.1f} {v['wall_s']:8.1f}")
    print(f"ratio mmpt/OpenCLIP: {ratio:.2f}x")
    write_result(out, {"benchmark": name, "model": model, **settings, "results": results, "ratio": ratio,
                       "machine": machine()})
    return ratio
