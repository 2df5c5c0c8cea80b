"""loss.png: smoothed curves next to the raw ones, eval metrics over steps when a run has them."""

from __future__ import annotations

import json
from pathlib import Path

from mmpt.training.plot import headline, plot_run, smooth


def test_smooth_is_debiased_ema() -> None:
    assert smooth([4.0, 4.0, 4.0]) == [4.0, 4.0, 4.0]  # not pulled towards 0 at the start
    out = smooth([0.0, 10.0], weight=0.5)
    assert out[0] == 0.0 and abs(out[1] - 5.0 / 0.75) < 1e-9


def test_plot_run_with_eval_metrics(tmp_path: Path) -> None:
    recs = [{"kind": "train", "step": s, "loss": 5.0 - 0.1 * s, "loss/clip": 5.0 - 0.1 * s} for s in range(1, 30)]
    recs += [{"kind": "eval/zero_shot/color", "step": s, "top1": 0.1 * s, "chance": 0.1, "top1_over_chance": s}
             for s in (10, 20, 29)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png" and out.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(out).size[0] > Image.open(out).size[1] * 2  # two panels side by side
    assert headline("top1") and headline("i2t_r1") and not headline("top1_over_chance") and not headline("chance")


def test_plot_run_without_records(tmp_path: Path) -> None:
    assert plot_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval/x", "step": 1, "top1": 0.5}) + "\n")
    assert plot_run(tmp_path) is None
