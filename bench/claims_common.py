"""Shared pieces of the seed-claim scripts (``bench/claims_*.py``): demo data, one training run of a shipped
recipe in its own process, the held-out demo evaluation, and the JSON + plot they write."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import MMPT, RESULTS, machine, run_logged, thread_env

from mmpt.eval import run_tasks

DEMO_TASKS = ("color", "shape")
# The CLIP baseline of every claim: the compared recipe (same towers, data, schedule) with its objective
# swapped for clip and clip-tiny's optimizer settings of the ViT towers (lr 2e-3, beta2 0.98). Not clip-tiny
# itself: its towers may change (it moved to a ResNet image tower), and a claim compares objectives only.
CLIP_TWIN = ["objectives={clip: {name: clip, pairs: [[image, text]], gather: no_grad}}", "optim.lr=2.0e-3",
             "optim.betas=[0.9, 0.98]", "optim.lr_scale={}"]


def add_run_args(p: argparse.ArgumentParser, steps: int, work: str) -> None:
    """Options every claim shares: training length, where runs go, threads."""
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps of every run (the same for all)")
    p.add_argument("--data", default="runs/demo/data", help="demo data folder (generated if missing)")
    p.add_argument("--work", default=work, help="folder for the training runs")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run (1: no spinning on a shared machine)")


def ensure_demo_data(data: Path, threads: int) -> None:
    """``mmpt data demo`` into ``data`` unless it is there (the same set ``mmpt demo`` makes)."""
    if (data / "info.json").exists():
        return
    run_logged([str(MMPT), "data", "demo", "--out", str(data)], data.parent / "demo-data.log", thread_env(threads))


def train_recipe(recipe: str, run_dir: Path, data: Path, steps: int, overrides: list[str], threads: int) -> dict:
    """Train ``recipe`` on the demo data for ``steps`` in a fresh process; returns wall seconds and summary."""
    sets = [f"train.out_dir={run_dir}", f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.keep_last=1",
            "train.eval_every=0", f"data.sources=[{data / 'train'}]", *overrides]
    cmd = [str(MMPT), "train", recipe, *[a for s in sets for a in ("--set", s)]]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a claim run starts from scratch: never resume an older one
    wall, _ = run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", thread_env(threads, MMPT_DEMO_DATA=str(data)))
    summary = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"summary"' in ln]
    return {"wall_s": round(wall, 1), "summary": summary[-1]["summary"] if summary else ""}


def demo_eval(model: Any, transforms: dict, data: Path, **task_keys: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out zero-shot top-1 (colour, shape) and retrieval R@1 (both directions) of a loaded model,
    and the chance level of each; ``task_keys`` are set on every task (e.g. ``dim=32, layer=2``)."""
    tasks = [{"name": "zero_shot", "data": str(data / "eval"), "label_key": k, "classnames": str(data / "classes" / f"{k}.txt"),
              "templates": str(data / "templates" / f"{k}.txt"), **task_keys} for k in DEMO_TASKS]
    tasks.append({"name": "retrieval", "data": str(data / "eval"), **task_keys})
    res = run_tasks(model.model, transforms, tasks, device="cpu", progress=False)
    out = {f"{k}_top1": res[f"zero_shot/{k}"]["top1"] for k in DEMO_TASKS}
    out.update(i2t_r1=res["retrieval"]["i2t_r1"], t2i_r1=res["retrieval"]["t2i_r1"])
    chance = {f"{k}_top1": res[f"zero_shot/{k}"]["chance"] for k in DEMO_TASKS}
    chance.update(i2t_r1=res["retrieval"]["i2t_r1_chance"], t2i_r1=res["retrieval"]["t2i_r1_chance"])
    return out, chance


def write_json(name: str, payload: dict) -> Path:
    """``bench/results/<name>.json`` with the machine and its load (these machines are shared)."""
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"claim": name, **payload, "machine": machine(),
                               "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1) + "\n")
    return out


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table (floats with 3 decimals)."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def grouped_bars(ax: Any, keys: list[str], series: dict[str, list[float]], fontsize: int = 8) -> None:
    """One group of bars per key, one bar per named series, on a 0-1 axis with a legend."""
    import numpy as np

    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(keys)) + j * width, values, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(series) - 1) / 2, keys, fontsize=fontsize)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
