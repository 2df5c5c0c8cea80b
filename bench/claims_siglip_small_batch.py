"""Seed claim (SigLIP, Zhai et al. 2023): the sigmoid loss is at least as good as CLIP's softmax at small batch.

One command trains ``siglip-tiny`` and its CLIP twin (the same recipe with the clip objective and CLIP's
optimizer settings lr 2e-3, beta2 0.98; siglip-tiny trains with lr 1e-3, beta2 0.95 and a 100x lr on its
bias; identical towers, schedule and data order) at batch 16, 32 and 64 for the same number of steps,
evaluates each on the held-out
demo split (zero-shot colour and shape top-1, retrieval R@1), prints a table, draws
``bench/results/claims_siglip_small_batch.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_siglip_small_batch.py            # 6 runs of 200 steps
    .venv/bin/python bench/claims_siglip_small_batch.py --steps 100 --batches 16 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import (  # noqa: E402
    CLIP_TWIN,
    add_run_args,
    demo_eval,
    ensure_demo_data,
    print_table,
    train_recipe,
    write_json,
)
from common import RESULTS  # noqa: E402

NAME = "claims_siglip_small_batch"
RECIPES = {"clip": ("siglip-tiny", CLIP_TWIN), "siglip": ("siglip-tiny", [])}
METRICS = ("color_top1", "shape_top1", "i2t_r1", "t2i_r1")


def plot(rows: list[dict], out: Path) -> Path:
    """One panel per metric: value against batch size, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for objective in RECIPES:
            pts = sorted((r["batch"], r[metric]) for r in rows if r["objective"] == objective)
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=objective)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in rows}), labels=[str(b) for b in sorted({r["batch"] for r in rows})])
        ax.set_title(metric)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0].legend()
    steps = rows[0]["steps"]
    fig.suptitle(f"SigLIP vs CLIP on the demo data, {steps} steps each (held-out split)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=200, work="runs/claims/siglip")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="batch sizes to compare")
    a = p.parse_args()
    from mmpt.commands.export import load

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    rows, chance = [], {}
    for batch in a.batches:
        for objective, (recipe, twin) in RECIPES.items():
            run_dir = work / f"{objective}-b{batch}"
            # the same warm-up fraction for every length; nothing else differs between the two objectives
            sets = [*twin, f"data.batch_size={batch}", f"optim.warmup_steps={max(1, a.steps // 10)}"]
            run = train_recipe(recipe, run_dir, data, a.steps, sets, a.threads)
            model, transforms, _ = load(run_dir)
            scores, chance = demo_eval(model, transforms, data)
            row = {"objective": objective, "batch": batch, "steps": a.steps, **scores, **run}
            print(f"{objective:6s} batch {batch:3d}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS)
                  + f" ({run['wall_s']:.0f} s)", flush=True)
            rows.append(row)
    print()
    print_table(["batch", "objective", *METRICS, "train s"],
                [[r["batch"], r["objective"], *[r[k] for k in METRICS], f"{r['wall_s']:.0f}"] for r in rows])
    wins = [(b, m) for b in a.batches for m in METRICS
            if _value(rows, "siglip", b, m) >= _value(rows, "clip", b, m)]
    print(f"\nsiglip >= clip in {len(wins)} of {len(a.batches) * len(METRICS)} (batch, metric) cells "
          f"(chance: {', '.join(f'{k} {v:.4f}' for k, v in chance.items())})")
    png = plot(rows, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"steps": a.steps, "batches": a.batches, "recipes": RECIPES,
                                         "threads": a.threads, "seed": 0}, "chance": chance, "rows": rows,
                            "siglip_ge_clip_cells": [list(w) for w in wins]})
    print(f"plot: {png}\nresults: {out}")
    return 0


def _value(rows: list[dict], objective: str, batch: int, metric: str) -> float:
    return next(r[metric] for r in rows if r["objective"] == objective and r["batch"] == batch)


if __name__ == "__main__":
    sys.exit(main())
