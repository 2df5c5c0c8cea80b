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
from mmpt.commands.embed import embed
from mmpt.commands.export import export
from mmpt.config import load_config
from mmpt.data.loader import eval_loader
from mmpt.training.loop import train


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


def read_keys(out: Path, prefix: str = "img") -> list[str]:
    keys = []
    for meta in sorted((out / "metadata").glob(f"{prefix}_metadata_*.parquet")):
        idx = meta.stem.rsplit("_", 1)[1]
        emb = np.load(out / f"{prefix}_emb" / f"{prefix}_emb_{idx}.npy")
        table = pq.read_table(meta)
        assert emb.shape[0] == table.num_rows
        keys += table.column("key").to_pylist()
    return keys


def shard_keys(url: str) -> list[str]:
    import tarfile

    with tarfile.open(url) as tar:
        return sorted({m.name.split(".")[0] for m in tar})


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


def test_embed_into_existing_folder_is_keyed_by_shard_identity(trained: tuple[Path, Path], color_shards: list[str],
                                                               tmp_path: Path) -> None:
    _, path = trained
    s0, s1, s2 = color_shards
    out = tmp_path / "emb"
    first = embed(str(path), s0, "image", str(out), batch_size=16, progress=False)
    assert first.shards_done == 1
    # A second shard list into the same folder: s1 is new, not "already done" because it is first in the list.
    second = embed(str(path), s1, "image", str(out), batch_size=16, progress=False)
    assert second.shards_done == 1 and second.shards_skipped == 0 and second.rows == 50
    assert str(second).startswith("embedded 50 samples from 1 shards (0 already done; skipped 0 samples)")
    assert sorted(read_keys(out)) == sorted(shard_keys(s0) + shard_keys(s1))
    # Another order with one new shard: only s2 runs, every key once.
    third = embed(str(path), "::".join([s2, s1, s0]), "image", str(out), batch_size=16, progress=False)
    assert third.shards_done == 1 and third.shards_skipped == 2
    assert sorted(read_keys(out)) == sorted(shard_keys(s0) + shard_keys(s1) + shard_keys(s2))


def test_embed_resume_after_kill_with_reordered_list(trained: tuple[Path, Path], color_shards: list[str],
                                                     tmp_path: Path) -> None:
    _, path = trained
    out = tmp_path / "emb"
    with pytest.raises(SystemExit):
        embed(str(path), "::".join(color_shards[:2]), "image", str(out), batch_size=16, workers=0, progress=False,
              stop_after_shards=1)
    embed(str(path), "::".join(reversed(color_shards)), "image", str(out), batch_size=16, progress=False)
    keys = read_keys(out)
    assert len(keys) == 150 and sorted(keys) == sorted(k for u in color_shards for k in shard_keys(u))


def test_embed_refuses_folder_of_other_model_settings_or_changed_shard(trained: tuple[Path, Path],
                                                                       color_shards: list[str], tmp_path: Path) -> None:
    from exportkit import rewrite
    from safetensors.torch import load_file

    from mmpt.registry import ConfigError

    _, path = trained
    shard = tmp_path / "s.tar"
    shard.write_bytes(Path(color_shards[0]).read_bytes())
    out = tmp_path / "emb"
    embed(str(path), str(shard), "image", str(out), batch_size=16, progress=False)
    with pytest.raises(ConfigError, match=r"written for another settings"):
        embed(str(path), str(shard), "image", str(out), batch_size=16, progress=False, dtype="float32")
    name, value = next(iter(load_file(str(path)).items()))
    other = rewrite(path, tmp_path / "other.safetensors", tensors={name: value + 1})
    with pytest.raises(ConfigError, match=r"written for another model"):
        embed(str(other), str(shard), "image", str(out), batch_size=16, progress=False)
    shard.write_bytes(Path(color_shards[1]).read_bytes())  # same path, other content
    with pytest.raises(ConfigError, match=r"shard .*s.tar changed since it was embedded there"):
        embed(str(path), str(shard), "image", str(out), batch_size=16, progress=False)
    legacy = tmp_path / "legacy"
    (legacy / "img_emb").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no img_manifest.json"):
        embed(str(path), str(shard), "image", str(legacy), batch_size=16, progress=False)


def test_image_and_text_runs_share_a_folder(trained: tuple[Path, Path], color_shards: list[str],
                                            tmp_path: Path) -> None:
    _, path = trained
    out = tmp_path / "emb"
    embed(str(path), color_shards[0], "image", str(out), batch_size=16, progress=False)
    embed(str(path), color_shards[1], "text", str(out), batch_size=16, progress=False)
    assert sorted(read_keys(out, "img")) == shard_keys(color_shards[0])
    assert sorted(read_keys(out, "text")) == shard_keys(color_shards[1])
    assert pq.read_table(out / "metadata" / "img_metadata_0.parquet").column("shard")[0].as_py() == color_shards[0]


def test_cli_embed_metadata_columns_and_errors(trained: tuple[Path, Path], color_shards: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import json

    from mmpt.cli import main

    _, path = trained
    out = tmp_path / "emb"
    assert main(["embed", str(path), "--data", color_shards[0], "--modality", "image", "--out", str(out),
                 "--metadata", "caption,json"]) == 0
    table = pq.read_table(out / "metadata" / "img_metadata_0.parquet").to_pylist()
    assert len(table) == 40
    row = table[0]
    assert row["caption"] == f"a {json.loads(row['json'])['color']} square"
    capsys.readouterr()
    assert main(["embed", str(path), "--data", color_shards[0], "--modality", "audio", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--modality audio" in err and "image, text" in err and "\n" not in err
    assert main(["embed", str(path), "--data", color_shards[0], "--modality", "image", "--out", str(out),
                 "--metadata", "captions"]) == 2
    assert "--metadata captions: unknown field" in capsys.readouterr().err


def test_weights_digest_covers_every_tensor_kind() -> None:
    from mmpt.commands.embed import weights_digest

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)  # 0-dim buffer
    before = weights_digest(model)
    assert weights_digest(model) == before
    model[1].running_mean[0] += 1
    assert weights_digest(model) != before


def test_embed_reports_samples_without_the_modality(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Samples lacking the embedded modality get no row; the summary says how many, not 'skipped 0'."""
    from shardkit import color_sample, write_tar

    samples = [color_sample(f"k{i:03d}", "red") for i in range(10)]
    for _, members in samples[:3]:
        del members["jpg"]
    shard = write_tar(tmp_path / "mixed.tar", samples)
    summary = embed(str(trained[1]), shard, "image", str(tmp_path / "emb"), batch_size=4, progress=False)
    assert summary.rows == 7 and summary.absent == 3
    assert "3 samples without image" in str(summary)


def test_embed_on_shards_without_the_modality_is_an_error(trained: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Writing nothing is an error: one line naming the shards and the modality, exit 2, no files left."""
    from shardkit import color_sample, write_tar

    from mmpt.cli import main

    samples = [color_sample(f"k{i:03d}", "blue") for i in range(6)]
    for _, members in samples:
        del members["jpg"]
    shard = write_tar(tmp_path / "captions-only.tar", samples)
    out = tmp_path / "emb"
    assert main(["embed", str(trained[1]), "--data", shard, "--modality", "image", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # past the progress bar
    assert len(errors) == 1 and errors[0].startswith("mmpt: error: ") and shard in errors[0], errors
    assert "'image'" in errors[0] and "6 samples" in errors[0], errors
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
