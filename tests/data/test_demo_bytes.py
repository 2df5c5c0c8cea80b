"""The demo's bytes are pinned: shards, class/template files and info.json of a small run hash as they did
when the image and caption renderers moved from the generator into their modalities' data sides (issue 19).

A failure means rendering changed (a draw added, reordered or resized, a member's encoding) or a pinned
library's encoder did (Pillow's JPEG): runs trained on earlier demo data would see other samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mmpt.data.demo_shards import generate_demo

# Same files in both runs: the class and template files do not depend on the modalities.
COMMON = {
    "classes/color.txt": "387d566435293bb45ec0393b58288f6b2a0148fd7edba06d8ddf80774aaf2110",
    "classes/shape.txt": "5bf4aa5f17655de3f6ebe1a13178fed10db525632241b3638cae05bba5630fe1",
    "templates/color.txt": "d7c5e41e3250c9b95b0ae984728909c41cadac59e8fbadb04ca6d57d6683a6bf",
    "templates/shape.txt": "7e5edd00fb16af0993a90ddfe4dfab5a5d57a278cb4a6873105ed160c8ee7d3b",
}
# sha256 of `mmpt data demo --train-samples 200 --eval-samples 50 --shard-size 80 [--modalities ...]`,
# recorded on the generator before the move.
EXPECTED = {
    ("image", "text"): {
        **COMMON,
        "eval/demo-eval-000000.tar": "060f4c3dc837aa8f45a299b3bf1d0834e22ea592797f6f2d50f94e7864b6e2be",
        "info.json": "ad28b3c20d1385e17ef583ff48b97a157ef1e0493b14002a3bc0c7ac5306a412",
        "train/demo-train-000000.tar": "e44189409b0defde32c4aacf6d9290f3a9895fe1d656209e89c40078127fde41",
        "train/demo-train-000001.tar": "7a35cad594a3602be0331bab2218e6f6e0d1dbad1436e5fb4b37b726fb09e73b",
        "train/demo-train-000002.tar": "69e3e6aae6ba723181dad587160ce10f643e9e36555f9e40154c31fec26bce14",
    },
    ("image", "text", "audio", "point_cloud", "protein"): {
        **COMMON,
        "eval/demo-eval-000000.tar": "49a2acfab7ca82054f4ae078b667952c6920a18fce6cca8828725d7359abcb24",
        "info.json": "23b71b148f577c74f0120d60f42b3b60d13a02e6834d0b14f6f940ad6a6d52e7",
        "train/demo-train-000000.tar": "6e279e3f2e76aeb540e61cfb610ee2cb4e65e8034392ad8b9be192275c7801bc",
        "train/demo-train-000001.tar": "eacdd188fae655439c696e56fca1259779b6d04d1b8ff6cbcbb51fa403591392",
        "train/demo-train-000002.tar": "5ee44e26ec1c55fb5b204b0eb9e20da007d50f05f63f723304236fef45c29722",
    },
    # Without the default modalities: no picture, but the captions the template files describe, and every
    # sample's concepts as in the runs above (the picture's draws are made whether or not it is written).
    ("audio",): {
        **COMMON,
        "eval/demo-eval-000000.tar": "f2c46b468ecfe0b8d22b23a76f2001943c58a3b368952014c792939d0f8abe36",
        "info.json": "9d53e2ac9515fed91adb515359c7dc25ec005b9e463c387db3298d3d8fd653e3",
        "train/demo-train-000000.tar": "2e8fb3437579151ca2ea4759aae7ac19c1edf94887877f7374ccb8d0a1d448b0",
        "train/demo-train-000001.tar": "61539bd36a3ab0137cbf6ac243b24b159f60a6759301afa19cb4c183d036a5c7",
        "train/demo-train-000002.tar": "ee0fa42fc903075a62f28bc6c3edfc5ba236318d6efeee21a515f1e047c72463",
    },
}


@pytest.mark.parametrize("modalities", list(EXPECTED), ids=",".join)
def test_demo_bytes_are_unchanged(modalities: tuple[str, ...], tmp_path: Path) -> None:
    generate_demo(tmp_path, train_samples=200, eval_samples=50, shard_size=80, modalities=modalities, progress=False)
    got = {p.relative_to(tmp_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in tmp_path.rglob("*") if p.is_file()}
    assert got == EXPECTED[modalities]
