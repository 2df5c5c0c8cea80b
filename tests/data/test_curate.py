"""MetaCLIP curation: Aho-Corasick counts against a brute-force scan, balancing probabilities, determinism,
parallel == serial, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmpt.data.curate import (
    ShardMatches,
    balance,
    build_automaton,
    curate,
    entry_probabilities,
    match,
    spaced,
)
from mmpt.data.shards import iter_samples
from mmpt.data.writer import ShardWriter

WORDS = ["red", "green", "blue", "star", "ring", "red star", "a", "tired", "blue ring", "ed"]


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = WORDS + ["circle", "the", "dog,", "star.", "Red", "re", "d", "tire"]
    return [" ".join(rng.choice(vocab, rng.integers(1, 7))) + rng.choice(["", ".", "!", " ,x"]) for _ in range(n)]


def _shards(folder: Path, captions: list[str], per_shard: int = 40) -> str:
    with ShardWriter(str(folder / "pool-%04d.tar"), max_count=per_shard) as w:
        for i, c in enumerate(captions):
            w.write(f"s{i:05d}", {"txt": c, "json": json.dumps({"i": i})})
    return str(folder / "pool-*.tar")


def _brute(entries: list[str], caption: str) -> list[int]:
    # MetaCLIP's rule spelled out without the automaton: the entry with a space either side occurs in the caption
    text = spaced(caption)
    return [i for i, e in enumerate(entries) if f" {e} " in text]


def test_spacing_and_word_boundaries() -> None:
    auto = build_automaton(["red", "red star", "star", "ed"])
    assert match(auto, "a red star.") == [0, 1, 2]
    assert match(auto, "tired,star") == [2]  # 'red' inside 'tired' is no match; the comma is spaced out
    assert match(auto, "Red star") == [2]  # case is kept, as MetaCLIP does
    assert match(auto, "red\tstar") == [0, 1, 2]


def test_counts_match_brute_force(tmp_path: Path) -> None:
    captions = _captions(300, 0)
    res = curate(_shards(tmp_path, captions), WORDS, t=10**9, out=str(tmp_path / "out" / "c-%04d.tar"),
                 caption_exts=["txt"], plot=False)
    brute = np.zeros(len(WORDS), np.int64)
    for c in captions:
        for i in _brute(WORDS, c):
            brute[i] += 1
    assert res.counts.tolist() == brute.tolist()
    assert res.samples == 300
    assert res.matched == sum(bool(_brute(WORDS, c)) for c in captions)
    # t above every count: every matched sample is kept, every unmatched one dropped
    assert res.kept == res.matched and res.curated_counts.tolist() == brute.tolist()
    saved = json.loads(res.counts_file.read_text())
    assert saved["counts"] == dict(zip(WORDS, brute.tolist(), strict=True))


def _synthetic(counts: dict[tuple[int, ...], int]) -> ShardMatches:
    keys, offsets, ids = [], [0], []
    for entries, n in counts.items():
        for _ in range(n):
            keys.append(str(len(keys)))
            ids.extend(entries)
            offsets.append(len(ids))
    return ShardMatches("x.tar", keys, np.asarray(offsets), np.asarray(ids))


def test_balancing_probabilities() -> None:
    # entry 0: 4000 samples alone; 1: tail (kept always); 2: head shared with 0
    groups = {(0,): 4000, (0, 1): 50, (0, 2): 2000, (2,): 1000, (): 10}
    shard = _synthetic(groups)
    counts = np.bincount(shard.ids, minlength=3)
    t = 400
    p = entry_probabilities(counts, t)
    assert p[1] == 1.0 and math.isclose(p[0], t / counts[0]) and math.isclose(p[2], t / counts[2])
    expected = {(0,): p[0], (0, 1): 1.0, (0, 2): 1 - (1 - p[0]) * (1 - p[2]), (2,): p[2], (): 0.0}
    kept = np.zeros(len(shard.keys))
    seeds = 20
    for seed in range(seeds):
        kept += balance(shard, p, seed)
    start = 0
    for group, n in groups.items():
        rate = kept[start:start + n].sum() / (n * seeds)
        sd = math.sqrt(expected[group] * (1 - expected[group]) / (n * seeds))
        assert abs(rate - expected[group]) <= 4 * sd + 1e-12, (group, rate, expected[group])
        start += n


def _output(res) -> list[bytes]:
    return [p.read_bytes() for p in res.shards]


def test_deterministic_and_parallel_equals_serial(tmp_path: Path) -> None:
    pool = _shards(tmp_path / "pool", _captions(400, 1), per_shard=50)
    runs = {}
    for name, seed, workers in (("a", 3, 1), ("b", 3, 1), ("par", 3, 2), ("other", 4, 1)):
        runs[name] = curate(pool, WORDS, t=20, out=str(tmp_path / name / "c-%04d.tar"), seed=seed, workers=workers,
                            caption_exts=["txt"], plot=name == "a")
    assert 0 < runs["a"].kept < runs["a"].matched
    assert runs["a"].kept_keys == runs["b"].kept_keys and _output(runs["a"]) == _output(runs["b"])
    assert runs["par"].kept_keys == runs["a"].kept_keys and _output(runs["par"]) == _output(runs["a"])
    assert runs["other"].kept_keys != runs["a"].kept_keys
    assert (tmp_path / "a" / "curation.png").stat().st_size > 0
    # curated samples are copied whole: members byte for byte
    first = next(s for s in iter_samples(str(runs["a"].shards[0])))
    src = {s["__key__"]: s for u in sorted((tmp_path / "pool").glob("*.tar")) for s in iter_samples(str(u))}
    assert first["txt"] == src[first["__key__"]]["txt"] and first["json"] == src[first["__key__"]]["json"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmpt.cli import main

    pool = _shards(tmp_path / "pool", _captions(60, 2))
    (tmp_path / "meta.txt").write_text("red\nstar\n\nblue ring\n")
    assert main(["data", "curate", pool, "--metadata", str(tmp_path / "meta.txt"), "--t", "5",
                 "--out", str(tmp_path / "cur" / "c-%04d.tar")]) == 0
    assert "curated" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cur" / "curation.json").read_text())
    assert set(saved["counts"]) == {"red", "star", "blue ring"} and "txt" in saved["caption_extensions"]
    (tmp_path / "dup.txt").write_text("red\nred\n")
    assert main(["data", "curate", pool, "--metadata", str(tmp_path / "dup.txt"), "--t", "5",
                 "--out", str(tmp_path / "x" / "c-%04d.tar")]) == 2
    assert "'red' is listed twice" in capsys.readouterr().err
