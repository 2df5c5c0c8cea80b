"""Claims (Matryoshka, Kusupati et al. 2022; Starbucks, Zhuang et al. 2024): nested sizes keep their accuracy.

One command trains four variants of the same CLIP twin of ``siglip-tiny`` (ViT + text transformer, 4 blocks
each, 128-d embeddings; the clip objective with CLIP's optimizer settings) for the same steps and data order:

* ``plain``: clip alone;
* ``mrl``: clip with ``matryoshka_dims: [16, 32, 64, 128]``;
* ``starbucks``: clip with ``starbucks: [[1, 16], [2, 32], [3, 64], [4, 128]]``, every pair every step;
* ``sampled``: the same list with ``starbucks_sample: true`` (the largest pair + one drawn pair a step: the
  random sub-model baseline).

It evaluates each on the held-out demo split through eval's ``dim``/``layer`` keys (zero-shot colour and shape
top-1, retrieval R@1): ``plain`` and ``mrl`` at full width, 1/4 (32) and 1/8 (16); ``starbucks`` and ``sampled``
at every (layer, dim) sub-model pair. Claim 1: at 1/4 and 1/8, ``mrl`` loses less than truncating ``plain``. Claim 2:
``starbucks`` beats ``sampled`` on the sub-models. Prints a table (mean and spread over seeds), draws
``bench/results/claims_matryoshka.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_matryoshka.py                       # 2 seeds x 4 runs of 150 steps, batch 32, 2 at a time
    .venv/bin/python bench/claims_matryoshka.py --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
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

NAME = "claims_matryoshka"
METRICS = ("color_top1", "shape_top1", "i2t_r1", "t2i_r1")
DIMS = [16, 32, 64, 128]
PAIRS = [[1, 16], [2, 32], [3, 64], [4, 128]]
CLIP = "name: clip, pairs: [[image, text]], gather: no_grad"
VARIANTS = {
    "plain": f"{{clip: {{{CLIP}}}}}",
    "mrl": f"{{clip: {{{CLIP}, matryoshka_dims: {DIMS}}}}}",
    "starbucks": f"{{clip: {{{CLIP}, starbucks: {PAIRS}}}}}",
    "sampled": f"{{clip: {{{CLIP}, starbucks: {PAIRS}, starbucks_sample: true}}}}",
}
# what each variant is evaluated at: (layer, dim); None = the whole tower / embedding. Starbucks and sampled
# both train the full pair every step: they are compared on the sub-models.
SIZES = {"plain": [(None, None), (None, 32), (None, 16)], "mrl": [(None, None), (None, 32), (None, 16)],
         "starbucks": [tuple(p) for p in PAIRS[:-1]], "sampled": [tuple(p) for p in PAIRS[:-1]]}


def size_label(layer: int | None, dim: int | None) -> str:
    """``L2 d32``, ``d32`` or ``full``."""
    return (f"L{layer} " if layer else "") + (f"d{dim}" if dim else "full")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(summary: dict, out: Path) -> Path:
    """Left: mean zero-shot/R@1 against width for plain (truncated) and mrl; right: starbucks vs sampled per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    widths = [128, 32, 16]
    for variant, style in (("plain", "--"), ("mrl", "-")):
        for metric in METRICS:
            means = [summary[variant][size_label(None, None if w == 128 else w)][metric][0] for w in widths]
            axes[0].plot(widths, means, style, marker="o", label=f"{variant} {metric}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(widths, labels=[str(w) for w in widths])
    axes[0].set_xlabel("embedding dims kept")
    axes[0].set_title("Matryoshka vs truncating a plain model")
    axes[0].legend(fontsize=6, ncol=2)
    labels = [size_label(*p) for p in PAIRS[:-1]]
    x = np.arange(len(labels))
    for j, variant in enumerate(("starbucks", "sampled")):
        means = [statistics.fmean(summary[variant][s][m][0] for m in METRICS) for s in labels]
        sds = [statistics.fmean(summary[variant][s][m][1] for m in METRICS) for s in labels]
        axes[1].bar(x + 0.4 * j, means, 0.4, yerr=sds, label=variant)
    axes[1].set_xticks(x + 0.2, labels)
    axes[1].set_ylabel("mean of the 4 metrics")
    axes[1].set_title("Starbucks list vs random sub-model sampling")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=150, work="runs/claims/matryoshka")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (model init and data order)")
    p.add_argument("--batch", type=int, default=32, help="batch size of every run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (separate processes)")
    a = p.parse_args()
    from mmpt.commands.export import load

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    rows, chance = [], {}
    jobs = [(seed, variant) for seed in a.seeds for variant in a.variants]

    def train(job: tuple[int, str]) -> dict:
        seed, variant = job
        sets = [*CLIP_TWIN, f"objectives={VARIANTS[variant]}", f"seed={seed}", f"data.batch_size={a.batch}",
                f"optim.warmup_steps={max(1, a.steps // 10)}"]
        run = train_recipe("siglip-tiny", work / f"{variant}-s{seed}", data, a.steps, sets, a.threads)
        print(f"trained seed {seed} {variant} in {run['wall_s']:.0f} s", flush=True)
        return run

    # training runs are separate processes: --jobs of them at a time; evaluation follows, in this process
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = dict(zip(jobs, pool.map(train, jobs), strict=True))
    for seed, variant in jobs:
        run, run_dir = runs[(seed, variant)], work / f"{variant}-s{seed}"
        model, transforms, _ = load(run_dir)
        for layer, dim in SIZES[variant]:
            scores, chance = demo_eval(model, transforms, data, layer=layer, dim=dim)
            rows.append({"variant": variant, "seed": seed, "layer": layer, "dim": dim, **scores,
                         "train_s": run["wall_s"]})
            print(f"seed {seed} {variant:9s} {size_label(layer, dim):8s}: "
                  + ", ".join(f"{k} {scores[k]:.3f}" for k in METRICS) + f" (train {run['wall_s']:.0f} s)",
                  flush=True)
    summary: dict = {}
    for r in rows:
        cell = summary.setdefault(r["variant"], {}).setdefault(size_label(r["layer"], r["dim"]), {})
        for m in METRICS:
            cell.setdefault(m, []).append(r[m])
    summary = {v: {s: {m: mean_sd(vals) for m, vals in cells.items()} for s, cells in sizes.items()}
               for v, sizes in summary.items()}
    print(f"\nmean (sd) over seeds {a.seeds}, {a.steps} steps of batch {a.batch}")
    print_table(["variant", "size", *METRICS],
                [[v, s, *[f"{summary[v][s][m][0]:.3f} ({summary[v][s][m][1]:.3f})" for m in METRICS]]
                 for v in summary for s in summary[v]])
    verdicts = {}
    if {"plain", "mrl"} <= set(summary):
        print("\nloss vs full width (full - truncated; smaller is better), per seed then averaged:")
        drop = {}
        for v in ("plain", "mrl"):
            for d in (32, 16):
                drop[(v, d)] = {m: statistics.fmean(
                    _value(rows, v, s, None, None, m) - _value(rows, v, s, None, d, m) for s in a.seeds) for m in METRICS}
        print_table(["width", "metric", "plain loses", "mrl loses", "mrl at width", "plain at width"],
                    [[f"1/{128 // d} ({d})", m, drop[("plain", d)][m], drop[("mrl", d)][m],
                      summary["mrl"][f"d{d}"][m][0], summary["plain"][f"d{d}"][m][0]]
                     for d in (32, 16) for m in METRICS])
        cells = [(d, m) for d in (32, 16) for m in METRICS]
        wins = [c for c in cells if drop[("mrl", c[0])][c[1]] < drop[("plain", c[0])][c[1]]]
        verdicts["mrl_loses_less"] = {"cells": len(cells), "wins": [list(w) for w in wins]}
        print(f"mrl loses less than truncated plain in {len(wins)} of {len(cells)} (width, metric) cells")
    if {"starbucks", "sampled"} <= set(summary):
        labels = [size_label(*p) for p in PAIRS[:-1]]
        cells = [(s, m) for s in labels for m in METRICS]
        wins = [c for c in cells if summary["starbucks"][c[0]][c[1]][0] > summary["sampled"][c[0]][c[1]][0]]
        verdicts["starbucks_beats_sampled"] = {"cells": len(cells), "wins": [list(w) for w in wins]}
        print(f"starbucks > sampled in {len(wins)} of {len(cells)} (sub-model pair, metric) cells")
    print(f"(chance: {', '.join(f'{k} {v:.4f}' for k, v in chance.items())})")
    png = plot(summary, RESULTS / f"{NAME}.png") if {"plain", "mrl", "starbucks", "sampled"} <= set(summary) else None
    out = write_json(NAME, {"settings": {"steps": a.steps, "batch": a.batch, "seeds": a.seeds, "variants": VARIANTS,
                                         "recipe": "siglip-tiny + CLIP_TWIN", "threads": a.threads},
                            "chance": chance, "rows": rows, "summary": summary, "verdicts": verdicts})
    print(f"plot: {png}\nresults: {out}")
    return 0


def _value(rows: list[dict], variant: str, seed: int, layer: int | None, dim: int | None, metric: str) -> float:
    return next(r[metric] for r in rows
                if r["variant"] == variant and r["seed"] == seed and r["layer"] == layer and r["dim"] == dim)


if __name__ == "__main__":
    sys.exit(main())
