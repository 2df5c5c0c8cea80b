"""mmpt index: exact and approximate round trips, resume, refusals."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmpt.registry import ConfigError
from mmpt.search.build import build_index, choose_index, recall_at
from mmpt.search.store import IndexStore


def _embedded(emb: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Every embedded row of an embed folder (manifest order) and its (modality, key), read independently."""
    vecs, names = [], []
    for manifest in sorted(emb.glob("*_manifest.json")):
        m = json.loads(manifest.read_text())
        prefix = manifest.name.removesuffix("_manifest.json")
        for i in range(len(m["shards"])):
            vecs.append(np.load(emb / f"{prefix}_emb" / f"{prefix}_emb_{i}.npy").astype(np.float32))
            keys = pq.read_table(emb / "metadata" / f"{prefix}_metadata_{i}.parquet").column("key").to_pylist()
            names += [(m["modality"], k) for k in keys]
    return np.concatenate(vecs), names


def test_exact_round_trip(search_env) -> None:  # noqa: ANN001
    vecs, names = _embedded(search_env.emb)
    store = IndexStore(str(search_env.index))
    assert store.manifest["index"]["kind"] == "flat" and store.manifest["count"] == len(vecs)
    assert store.modalities == {m: sum(1 for x, _ in names if x == m) for m in {x for x, _ in names}}
    scores, ids = store.search(vecs, 5)
    truth = np.argsort(-(vecs @ vecs.T), 1, kind="stable")[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(vecs @ vecs.T, truth, 1), atol=1e-4)
    for i in (0, 50, len(vecs) - 1):
        row = store.row(i)
        assert (row["modality"], row["key"]) == names[i]
        with tarfile.open(row["shard"]) as tar:  # members read by offset == tarfile's own read
            for ext in row["members"]:
                assert store.member(i, ext) == tar.extractfile(f"{row['key']}.{ext}").read()
    only_audio = store.search(vecs[:3], 4, "audio")[1]
    assert all(store.row(int(i))["modality"] == "audio" for i in only_audio.ravel())


def _fake_embed(root: Path, n: int, dim: int, shards: int, model: str = "m" * 64, seed: int = 0) -> np.ndarray:
    """An embed folder in `mmpt embed`'s layout with clustered unit vectors (as real embeddings are)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for i in range(shards):
        part = x[bounds[i]:bounds[i + 1]]
        np.save(root / "img_emb" / f"img_emb_{i}.npy", part.astype(np.float16))
        pq.write_table(pa.table({"key": [f"k{j}" for j in range(bounds[i], bounds[i + 1])],
                                 "shard": [f"s{i}.tar"] * len(part), "row": list(range(len(part)))}),
                       root / "metadata" / f"img_metadata_{i}.parquet")
    manifest = {"format": "mmpt-embed/1", "modality": "image", "model": model,
                "settings": {"normalize": True, "dtype": "float16", "metadata": []},
                "shards": [{"url": f"/nonexistent/s{i}.tar", "size": 1, "mtime_ns": 1} for i in range(shards)]}
    (root / "img_manifest.json").write_text(json.dumps(manifest))
    return x.astype(np.float16).astype(np.float32)


def test_approximate_recall_and_resume(tmp_path: Path) -> None:
    x = _fake_embed(tmp_path / "emb", 6000, 64, shards=4)
    # 8-bit codes: the budget leaves ~70 bytes a vector
    summary = build_index([str(tmp_path / "emb")], str(tmp_path / "ivf"), memory_budget=500_000, exact_below=1000,
                          progress=False)
    assert summary.kind == "ivf" and "SQ8" in summary.factory, summary
    store = IndexStore(str(tmp_path / "ivf"))
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 100)] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)  # unseen queries
    exact = np.argsort(-(q @ x.T), 1)[:, :10]
    _, found = store.search(q, 10)
    assert recall_at(found, exact, None, 10) >= 0.95
    # interrupted after one part, then resumed: the same index as the uninterrupted build
    with pytest.raises(SystemExit):
        build_index([str(tmp_path / "emb")], str(tmp_path / "ivf2"), memory_budget=500_000, exact_below=1000,
                    progress=False, stop_after_parts=1)
    assert (tmp_path / "ivf2" / ".build" / "partial.faiss").exists()
    assert not (tmp_path / "ivf2" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="unfinished build"):
        IndexStore(str(tmp_path / "ivf2"))
    with pytest.raises(ConfigError, match="unfinished build of other"):
        build_index([str(tmp_path / "emb")], str(tmp_path / "ivf2"), memory_budget=400_000, exact_below=1000,
                    progress=False)
    resumed = build_index([str(tmp_path / "emb")], str(tmp_path / "ivf2"), memory_budget=500_000,
                          exact_below=1000, progress=False)
    assert resumed.resumed_rows == 1500 and resumed.nprobe == summary.nprobe
    np.testing.assert_array_equal(IndexStore(str(tmp_path / "ivf2")).search(q, 10)[1], found)
    assert not (tmp_path / "ivf2" / ".build").exists()
    # the shortlist is re-ranked from the embed files; without them, the codes alone rank (with a warning)
    assert store.rerank and np.allclose(store.search(q[:5], 10)[0], np.sort(q[:5] @ x.T, 1)[:, ::-1][:, :10], atol=1e-4)
    (tmp_path / "emb").rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="gone or changed"):
        codes_only = IndexStore(str(tmp_path / "ivf"))
    assert not codes_only.rerank and recall_at(codes_only.search(q, 10)[1], exact, None, 10) >= 0.8


def test_choice_follows_count_and_budget() -> None:
    gib = 1 << 30
    assert choose_index(100_000, 512, 4 * gib, 500_000).kind == "flat"
    assert choose_index(100_000, 512, 100 << 20, 500_000).factory == "IVF256,SQfp16"  # flat would not fit
    assert choose_index(1_000_000, 512, 4 * gib, 500_000).factory == "IVF1024,SQfp16"
    assert choose_index(1_000_000, 512, 700 << 20, 500_000).factory == "IVF1024,SQ8"
    assert choose_index(100_000_000, 512, 8 * gib, 500_000).factory == "IVF8192,PQ64"
    with pytest.raises(ConfigError, match="too small"):
        choose_index(100_000_000, 512, 1 * gib, 500_000)


def test_refusals(tmp_path: Path, search_env) -> None:  # noqa: ANN001
    _fake_embed(tmp_path / "a", 300, 16, shards=1, model="a" * 64)
    _fake_embed(tmp_path / "b", 300, 16, shards=1, model="b" * 64)
    with pytest.raises(ConfigError, match="another model"):
        build_index([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "x"), progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "img_emb" / "img_emb_0.npy").unlink()
    with pytest.raises(ConfigError, match="no embeddings yet"):
        build_index([str(tmp_path / "c")], str(tmp_path / "y"), progress=False)
    with pytest.raises(ConfigError, match="other embeddings"):  # a finished index of other inputs
        build_index([str(tmp_path / "a")], str(search_env.index), progress=False)
    # serving with another model is refused, naming both digests
    from searchkit import tiny_model

    from mmpt.search.app import open_service

    other = tiny_model(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ConfigError, match="not the model that embedded"):
        open_service(str(other), str(search_env.index))


def test_cli_index_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmpt.cli import main

    _fake_embed(tmp_path / "emb", 500, 16, shards=2)
    assert main(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    assert "indexed 500 vectors (flat: Flat)" in capsys.readouterr().out
    assert main(["index", str(tmp_path / "nothing"), "--out", str(tmp_path / "idx2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpt: error:") and "no such folder" in err and "\n" not in err
    assert main(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx3"), "--memory-budget", "lots"]) == 2
    assert "--memory-budget lots" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "m.safetensors"), str(tmp_path / "emb")]) == 2  # not an index folder
    assert "no manifest.json" in capsys.readouterr().err
