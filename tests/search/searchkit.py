"""Test helpers for search: a tiny untrained model with every query modality, demo shards, embeddings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TOWERS = {
    "image": {"name": "image/vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
    "text": {"name": "text/transformer", "context_length": 16, "width": 32, "depth": 1, "heads": 2},
    "audio": {"name": "audio/ast", "sample_rate": 8000, "clip_seconds": 0.5, "n_fft": 256, "hop_length": 80,
              "n_mels": 16, "f_max": 4000.0, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
    "point_cloud": {"name": "point_cloud/point_transformer", "num_points": 64, "groups": 8, "group_size": 8,
                    "channels": "xyzrgb", "width": 32, "depth": 1, "heads": 2, "pointnet_hidden": 16},
    "protein": {"name": "protein/transformer", "context_length": 32, "width": 32, "depth": 1, "heads": 2},
}


def tiny_model(path: Path, seed: int = 0) -> Path:
    """An untrained export with a tower per modality, each bound to text (weights from ``seed``)."""
    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer, set_seed

    raw = {"name": "search-tiny", "seed": seed, "model": {"embed_dim": 24, "encoders": TOWERS},
           "objectives": {"clip": {"name": "clip", "pairs": [[m, "text"] for m in TOWERS if m != "text"]}},
           "data": {"sources": ["unused.tar"], "batch_size": 4},
           "train": {"out_dir": str(path.parent / "run"), "steps": 1}}
    cfg = load_config(raw)
    set_seed(seed)
    return write_export(build_pretrainer(cfg).state_dict(), cfg, path)


def demo_shards(root: Path, eval_samples: int = 48, shard_size: int = 24) -> Path:
    """Demo shards rendering every modality of TOWERS; returns the eval folder."""
    from mmpt.data.demo_shards import generate_demo

    configs = {m: {k: v for k, v in c.items() if k != "name"} for m, c in TOWERS.items()}
    generate_demo(root, train_samples=shard_size, eval_samples=eval_samples, shard_size=shard_size,
                  modalities=list(TOWERS), modality_configs=configs, progress=False)
    return root / "eval"


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, index: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``mmpt serve`` in a subprocess on a free port; returns (process, base url) once it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmpt", "serve", str(model), str(index), "--port", str(port),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mmpt serve exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "api/info", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mmpt serve did not answer within 60 s")
