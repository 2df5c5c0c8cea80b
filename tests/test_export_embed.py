"""Export -> load gives the same embeddings; embedding extraction writes every key exactly once and
resumes after a kill without duplicates or losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shardkit import COLORS, tiny_config

import mmpt
from mmpt.config import load_config
from mmpt.data.loader import eval_loader
from mmpt.embed import embed
from mmpt.export import export
from mmpt.train.loop import train


@pytest.fixture(scope="module")
def trained(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("exp") / "run"
    train(load_config(tiny_config(color_shards, out, steps=4, log_sample_keys=False)))
    return out, export(out, out.parent / "model.safetensors")


def test_export_load_same_embeddings(trained: tuple[Path, Path], color_shards: list[str]) -> None:
    run_dir, path = trained
    model, transforms, tokenizer = mmpt.load(str(path))
    from_run, _, _ = mmpt.load(str(run_dir))  # straight from the checkpoint, no export
    batch = next(iter(eval_loader(color_shards[:1], transforms, 8, workers=0)))
    a = model.encode("image", batch.fields["image"])
    torch.testing.assert_close(a, from_run.encode("image", batch.fields["image"]), rtol=0, atol=0)
    assert torch.allclose(a.norm(dim=-1), torch.ones(8), atol=1e-5)
    # raw inputs go through the same transforms as the loader
    from PIL import Image

    img = Image.new("RGB", (40, 40), COLORS["red"])
    raw = model.encode("image", [img])
    assert raw.shape == (1, 32)
    t = model.encode("text", ["a red square", "a blue square"])
    ids, mask = tokenizer.encode(["a red square", "a blue square"])
    torch.testing.assert_close(t, model.encode("text", {"ids": ids, "mask": mask}))
    # every trainable part came back, including the objective's logit scale
    state = model.state_dict()
    assert any(k.startswith("objectives.clip.") for k in state)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an mmpt export"):
        mmpt.load(str(tmp_path / "x.safetensors"))


def read_keys(out: Path) -> list[str]:
    keys = []
    for meta in sorted((out / "metadata").glob("metadata_*.parquet")):
        idx = meta.stem.split("_")[1]
        emb = np.load(out / "img_emb" / f"img_emb_{idx}.npy")
        table = pq.read_table(meta)
        assert emb.shape[0] == table.num_rows
        keys += table.column("key").to_pylist()
    return keys


def test_embed_every_key_exactly_once_and_resume(trained: tuple[Path, Path], color_shards: list[str],
                                                 tmp_path: Path) -> None:
    _, path = trained
    pattern = "::".join(color_shards)
    full = embed(str(path), pattern, "image", str(tmp_path / "full"), batch_size=16, workers=2, progress=False)
    assert full.rows == 150 and full.shards_done == 3
    keys = read_keys(tmp_path / "full")
    assert len(keys) == 150 and len(set(keys)) == 150
    emb = np.load(tmp_path / "full" / "img_emb" / "img_emb_0.npy").astype(np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)

    out = tmp_path / "killed"
    with pytest.raises(SystemExit):
        embed(str(path), pattern, "image", str(out), batch_size=16, workers=2, progress=False, stop_after_shards=1)
    assert len(list((out / "img_emb").glob("*.npy"))) == 1
    resumed = embed(str(path), pattern, "image", str(out), batch_size=16, workers=2, progress=False)
    assert resumed.shards_skipped == 1 and resumed.shards_done == 2
    assert sorted(read_keys(out)) == sorted(keys)


def test_embed_two_ranks_split_shards(trained: tuple[Path, Path], color_shards: list[str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = trained
    for rank in range(2):  # each rank takes every other shard; together they cover every key once
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        embed(str(path), "::".join(color_shards), "image", str(tmp_path / "ranks"), batch_size=16, progress=False)
    keys = read_keys(tmp_path / "ranks")
    assert len(keys) == 150 and len(set(keys)) == 150


def test_cli_eval_on_export(trained: tuple[Path, Path], color_shards: list[str], tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    import json

    import yaml

    from mmpt.cli import main

    _, path = trained
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump([{"name": "zero_shot", "data": color_shards[0], "label_key": "color",
                                      "classnames": list(COLORS), "templates": ["a {} square"]}]))
    assert main(["eval", str(path), "--tasks-file", str(tasks), "--out", str(tmp_path / "r.json")]) == 0
    assert "zero_shot/color" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())["zero_shot/color"]
    assert result["n"] == 40 and result["chance"] == 0.25
