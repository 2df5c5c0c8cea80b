"""Test helpers: write small WebDataset shards (with chosen defects) and tiny configs."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}


def jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    """A JPEG of a square of ``color`` on black."""
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write (key, {ext: bytes}) samples to one tar; returns its path."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def color_sample(key: str, name: str) -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": jpeg(COLORS[name]), "txt": f"a {name} square".encode(),
                 "json": json.dumps({"color": name, "captions": [f"a {name} square"]}).encode()}


def write_color_shards(root: Path, counts: tuple[int, ...] = (40, 50, 60), prefix: str = "s") -> list[str]:
    """Uneven shards of coloured squares; keys are unique across shards."""
    names = list(COLORS)
    rng = np.random.default_rng(0)
    out = []
    for s, n in enumerate(counts):
        samples = [color_sample(f"{prefix}{s}_{i:05d}", names[rng.integers(len(names))]) for i in range(n)]
        out.append(write_tar(Path(root) / f"{prefix}-{s:03d}.tar", samples))
    return out


def tiny_config(shards: list[str], out_dir: Path, **train) -> dict:
    """A tiny CLIP config dict (image 32 px, 1-layer towers)."""
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"embed_dim": 32, "encoders": {
            "image": {"name": "image/vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"name": "text/transformer", "context_length": 16, "width": 32, "depth": 1, "heads": 2}}},
        "objectives": {"clip": {"name": "clip", "pairs": [["image", "text"]]}},
        "data": {"sources": ["::".join(shards)], "batch_size": 8, "workers": 2, "shuffle_buffer": 30,
                 "required": ["image", "text"]},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"out_dir": str(out_dir), "steps": 8, "log_every": 2, "checkpoint_every": 3, "progress": False,
                  "log_sample_keys": True, **train},
    }


def member_spans(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (header offset, data end)`` of every member of a tar (to cut it at a chosen place)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data + m.size) for m in tar.getmembers()}


def cut_tar(path: Path, out: Path, size: int) -> str:
    """Copy the first ``size`` bytes of the tar at ``path`` to ``out``, like a transfer broken off."""
    Path(out).write_bytes(Path(path).read_bytes()[:size])
    return str(out)


def bad_samples(n: int, prefix: str = "bad") -> list[tuple[str, dict[str, bytes]]]:
    """``n`` samples whose image does not decode (a JPEG header and nothing else)."""
    return [(f"{prefix}{i:04d}", {"jpg": b"\xff\xd8\xff broken", "txt": b"a broken picture"}) for i in range(n)]


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def fresh_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process as a new shell would give it: without the rendezvous variables that
    in-process training in this pytest process set (a child would try to bind the same MASTER_PORT)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(extra)
    return env


def read_shards(paths: list) -> list[tuple[str, dict[str, bytes]]]:
    """Samples in order as (key, {ext: bytes}), grouped the way webdataset groups members."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
    return samples
