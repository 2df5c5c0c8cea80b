"""`mmpt embed` compute precision: bf16 autocast within a stated tolerance of fp32, `auto` resolution, and a
folder keeps the precision it was started with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from exportkit import train_and_export

from mmpt.commands.embed import embed, resolve_precision
from mmpt.registry import ConfigError


@pytest.fixture(scope="module")
def model_path(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_export(color_shards, tmp_path_factory.mktemp("prec"))


def _rows(out: Path) -> tuple[list[str], np.ndarray]:
    keys = pq.read_table(out / "metadata" / "img_metadata_0.parquet").column("key").to_pylist()
    return keys, np.load(out / "img_emb" / "img_emb_0.npy")


def test_bf16_embeddings_within_tolerance_of_fp32(model_path: Path, color_shards: list[str], tmp_path: Path) -> None:
    """Tolerance: unit embeddings differ by <= 1e-2 per component and keep cosine >= 0.999 with fp32
    (measured on this model: max 1.7e-3, cosine >= 0.99999)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        summary = embed(str(model_path), color_shards[0], "image", str(tmp_path / precision), batch_size=16,
                        workers=0, dtype="float32", progress=False, precision=precision)
        assert summary.rows == 40 and summary.seconds > 0 and "samples/s" in str(summary)
        runs[precision] = _rows(tmp_path / precision)
    (keys32, e32), (keys16, e16) = runs["fp32"], runs["bf16"]
    assert keys32 == keys16
    assert np.abs(e32 - e16).max() <= 1e-2
    assert (e32 * e16).sum(1).min() >= 0.999
    assert np.abs(e32 - e16).max() > 0  # bf16 did run in lower precision


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="--precision fp16: expected one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_folder_keeps_its_precision(model_path: Path, color_shards: list[str], tmp_path: Path) -> None:
    """Rows of two precisions never mix in one folder; an fp32 folder's manifest is the one older versions
    wrote (no precision key), so folders from before this option still resume."""
    import json

    out = tmp_path / "emb"
    embed(str(model_path), color_shards[0], "image", str(out), batch_size=16, workers=0, progress=False,
          precision="fp32")
    assert "precision" not in json.loads((out / "img_manifest.json").read_text())["settings"]
    with pytest.raises(ConfigError, match="written for another settings"):
        embed(str(model_path), color_shards[1], "image", str(out), batch_size=16, workers=0, progress=False,
              precision="bf16")


def test_cli_passes_precision(model_path: Path, color_shards: list[str], tmp_path: Path) -> None:
    import json

    from mmpt.cli import main

    out = tmp_path / "cli"
    main(["embed", str(model_path), "--data", color_shards[0], "--modality", "image", "--out", str(out),
          "--batch-size", "16", "--workers", "0", "--precision", "bf16"])
    assert json.loads((out / "img_manifest.json").read_text())["settings"]["precision"] == "bf16"
