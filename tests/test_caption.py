"""`mmpt caption` on an export, the `caption` eval task and its scoring (attribute naming vs chance, BLEU-4,
CIDEr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shardkit import tiny_config

from mmpt.cli import main
from mmpt.commands.export import write_export
from mmpt.config import load_config
from mmpt.eval.captioning import attribute_scores, named_value, reference_scores, words
from mmpt.pretrainer import build_pretrainer


def export_with(objectives: dict, shards: list[str], root: Path) -> Path:
    """An export of a freshly built tiny model with ``objectives`` (weights as initialised)."""
    raw = tiny_config(shards, root / "run")
    raw["objectives"] = objectives
    cfg = load_config(raw)
    torch.manual_seed(0)
    model = build_pretrainer(cfg)
    return write_export(model.state_dict(), cfg, root / "model.safetensors")


COCA = {"coca": {"name": "coca", "width": 32, "depth": 1, "heads": 2, "memory_width": 32}}


def test_caption_command_writes_one_line_per_sample(color_shards: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    model = export_with(COCA, color_shards, tmp_path)
    out = tmp_path / "caps.jsonl"
    assert main(["caption", str(model), "--data", color_shards[0], "--modality", "image", "--out", str(out),
                 "--max-len", "6", "--strategy", "beam", "--beam", "2", "--n-best", "2", "--batch-size", "16"]) == 0
    summary = capsys.readouterr().out
    assert f"captioned 40 samples (beam, max_len 6) -> {out}" in summary
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 40 and len({r["key"] for r in records}) == 40
    for r in records:
        assert isinstance(r["caption"], str) and len(r["captions"]) == 2
        assert r["captions"][0]["score"] >= r["captions"][1]["score"]
        assert r["caption"] == r["captions"][0]["caption"]


def test_caption_command_refuses_a_model_that_cannot_caption(color_shards: list[str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    model = export_with({"clip": {"name": "clip", "pairs": [["image", "text"]]}}, color_shards, tmp_path)
    code = main(["caption", str(model), "--data", color_shards[0], "--modality", "image",
                 "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "no captioning objective (caption, coca); its objectives: clip" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.jsonl").exists()
    model = export_with(COCA, color_shards, tmp_path)
    code = main(["caption", str(model), "--data", color_shards[0], "--modality", "text", "--out", str(tmp_path / "x")])
    assert code == 2 and "--modality text: no captioning objective reads it; captioning objectives: coca (image)" \
        in capsys.readouterr().err


def test_caption_eval_task_runs_on_an_export(color_shards: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    model = export_with(COCA, color_shards, tmp_path)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"- {{name: caption, data: '{color_shards[1]}', attributes: [color], max_len: 5, limit: 20}}\n")
    out = tmp_path / "results.json"
    assert main(["eval", str(model), "--tasks-file", str(tasks), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "caption/image" in table and "color_acc" in table
    res = json.loads(out.read_text())["caption/image"]
    assert res["samples"] == 20 and res["color_acc_chance"] == 0.25
    assert 0 <= res["color_acc"] <= res["color_named"] <= 1
    assert {"bleu4", "cider"} <= set(res) and len(res["examples"]) == 3


def test_attribute_naming_skips_the_background_and_counts_chance() -> None:
    values = [("red",), ("blue",), ("light", "green")]
    caption = words("A red background with a light green circle")
    assert named_value(caption, values, {"background"}) == 2
    assert named_value(caption, values, set()) == 0
    assert named_value(words("a circle"), values, {"background"}) is None
    labels = [{"color": "blue", "shape": "star"}, {"color": "red", "shape": "ring"}, {"color": "red", "shape": "star"},
              {"shape": "ring"}]
    captions = ["a blue star on a red background", "a red background", "a blue ring", "a ring"]
    got = attribute_scores(captions, labels, ["color", "shape"], ["background"])
    # colour: 3 labelled samples, 1 right (blue), 1 names none (only the background), 1 wrong
    assert got["color_acc"] == pytest.approx(1 / 3) and got["color_named"] == pytest.approx(2 / 3)
    assert got["color_acc_chance"] == 0.5 and got["color_acc_over_chance"] == pytest.approx(2 / 3)
    assert got["shape_acc"] == pytest.approx(2 / 4) and got["shape_named"] == pytest.approx(3 / 4)


def test_reference_scores_are_pycocoevalcap_bleu_and_cider() -> None:
    refs = [["a red circle on a blue background", "a large red circle"], ["a small green star at the top"]]
    same = reference_scores(["a red circle on a blue background", "a small green star at the top"], refs)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["cider"] > 0
    other = reference_scores(["a green square", "a circle"], refs)
    assert other["bleu4"] < 0.1 and other["cider"] < same["cider"]
    assert reference_scores(["x"], [[]]) == {}
