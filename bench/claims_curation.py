"""Claim (MetaCLIP, Xu et al. 2023): on a pool with a skewed concept distribution, a curated subset
(``mmpt data curate``: substring matching against metadata entries, then balancing with threshold t) beats a
random subset of the same size on tail-class zero-shot.

One command: generates demo data, skews it into a pool where two head colours are 50x as frequent as each of
the eight tail colours (every other sample of a tail colour is dropped with probability 49/50), curates the pool
against MetaCLIP-style metadata (colour-shape bigrams, "<colour> shape", "<colour> background" and the shape
names), draws a random subset of the curated size, trains ``clip-tiny`` on each for the same steps, and scores
zero-shot colour on the balanced held-out demo split: mean per-class top-1 over the tail colours (the claim),
over the head colours, and shape top-1. Prints a table, draws ``bench/results/claims_curation.png`` and writes
the JSON next to it.

    .venv/bin/python bench/claims_curation.py                 # ~20 min on 2 cores under load 15
    .venv/bin/python bench/claims_curation.py --seeds 0 1 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import print_table, train_recipe, write_json  # noqa: E402
from common import RESULTS, demo_data  # noqa: E402

NAME = "claims_curation"
HEAD = ("red", "blue")
SKEW = 50


def metadata_entries() -> list[str]:
    """MetaCLIP-style entries over the demo's concepts: bigrams of colour and shape, and unigram-like phrases."""
    from mmpt.data.concepts import COLORS, SHAPES

    return ([f"{c} {s}" for c in COLORS for s in SHAPES] + [f"{c} shape" for c in COLORS]
            + [f"{c} background" for c in COLORS] + list(SHAPES))


def skewed_pool(data: Path, out: Path, seed: int) -> dict[str, int]:
    """Copy the demo train split into ``out`` keeping every head-colour sample and 1/SKEW of the others."""
    import numpy as np

    from mmpt.data.shards import ShardEvent, iter_samples
    from mmpt.data.writer import ShardWriter

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    with ShardWriter(str(out / "pool-%04d.tar"), max_count=1000) as w:
        for shard in sorted((data / "train").glob("*.tar")):
            for s in iter_samples(str(shard)):
                if isinstance(s, ShardEvent) or s.get("__cut__"):
                    continue
                color = json.loads(s["json"])["color"]
                if color in HEAD or rng.random() < 1 / SKEW:
                    w.write(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                    counts[color] = counts.get(color, 0) + 1
    return counts


def random_subset(pool: Path, out: Path, n: int, seed: int) -> dict[str, int]:
    """``n`` samples of the pool drawn uniformly without replacement, in pool order."""
    import numpy as np

    from mmpt.data.shards import ShardEvent, iter_samples
    from mmpt.data.writer import ShardWriter

    samples = [s for shard in sorted(pool.glob("*.tar")) for s in iter_samples(str(shard))
               if not isinstance(s, ShardEvent) and not s.get("__cut__")]
    chosen = set(np.random.default_rng(seed).choice(len(samples), n, replace=False).tolist())
    counts: dict[str, int] = {}
    with ShardWriter(str(out / "random-%04d.tar"), max_count=1000) as w:
        for i, s in enumerate(samples):
            if i in chosen:
                w.write(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                color = json.loads(s["json"])["color"]
                counts[color] = counts.get(color, 0) + 1
    return counts


def colour_counts(folder: Path) -> dict[str, int]:
    """Samples per object colour in a folder of shards."""
    from mmpt.data.shards import ShardEvent, iter_samples

    counts: dict[str, int] = {}
    for shard in sorted(folder.glob("*.tar")):
        for s in iter_samples(str(shard)):
            if not isinstance(s, ShardEvent) and not s.get("__cut__"):
                color = json.loads(s["json"])["color"]
                counts[color] = counts.get(color, 0) + 1
    return counts


def evaluate(run: Path, data: Path) -> dict:
    """Zero-shot colour (per class) and shape top-1 on the balanced held-out demo split."""
    import mmpt
    from mmpt.eval import run_tasks

    model, transforms, _ = mmpt.load(str(run))
    tasks = [{"name": "zero_shot", "data": str(data / "eval"), "label_key": k, "classnames": str(data / "classes" / f"{k}.txt"),
              "templates": str(data / "templates" / f"{k}.txt")} for k in ("color", "shape")]
    res = run_tasks(model.model, transforms, tasks, device="cpu", progress=False)
    per_class = res["zero_shot/color"]["per_class_top1"]
    tail = [c for c in per_class if c not in HEAD]
    return {"tail_color_top1": sum(per_class[c] for c in tail) / len(tail),
            "head_color_top1": sum(per_class[c] for c in HEAD) / len(HEAD),
            "color_top1": res["zero_shot/color"]["top1"], "shape_top1": res["zero_shot/shape"]["top1"],
            "per_color_top1": per_class, "n": res["zero_shot/color"]["n"]}


def plot(result: dict, out: Path) -> Path:
    """Left: samples per colour in the pool and the two subsets (log scale); right: zero-shot top-1 per colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mmpt.data.concepts import COLORS

    colors = list(COLORS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(colors))
    for j, name in enumerate(("pool", "curated", "random")):
        left.bar(x + (j - 1) * 0.27, [result["counts"][name].get(c, 0) for c in colors], 0.27, label=name)
    left.set_yscale("log")
    left.set_xticks(x, colors, rotation=35, fontsize=8)
    left.set_title("samples per object colour (head: " + ", ".join(HEAD) + ")", fontsize=9)
    left.legend(fontsize=8)
    for j, arm in enumerate(("curated", "random")):
        runs = result["runs"][arm]
        mean = [np.mean([r["per_color_top1"].get(c, 0) for r in runs]) for c in colors]
        right.bar(x + (j - 0.5) * 0.4, mean, 0.4, label=f"{arm} (tail mean "
                  f"{np.mean([r['tail_color_top1'] for r in runs]):.3f})")
    right.set_xticks(x, colors, rotation=35, fontsize=8)
    right.set_ylim(0, 1)
    right.set_title("zero-shot colour top-1 per class, held-out balanced split", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"MetaCLIP curation (t={result['settings']['t']}) vs a random subset of equal size "
                 f"({result['subset_size']} samples), clip-tiny, {result['settings']['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/claims/curation", help="folder for data and runs")
    p.add_argument("--t", type=int, default=20, help="MetaCLIP's per-entry threshold")
    p.add_argument("--steps", type=int, default=300, help="training steps of each arm (the same for both)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of each arm")
    p.add_argument("--train-samples", type=int, default=40000, help="demo samples the skewed pool is drawn from")
    p.add_argument("--workers", type=int, default=2, help="curation processes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="keep training runs already in --work")
    a = p.parse_args()
    import shutil

    from mmpt.data.curate import curate

    work = Path(a.work)
    data = work / "data"
    if not (data / "info.json").exists():
        demo_data(data, a.train_samples, 2000, 64, a.threads)
    for folder in ("pool", "curated", "random"):
        shutil.rmtree(work / folder, ignore_errors=True)
    pool_counts = skewed_pool(data, work / "pool", seed=0)
    (work / "metadata.txt").write_text("\n".join(metadata_entries()) + "\n")
    cur = curate(str(work / "pool" / "*.tar"), work / "metadata.txt", a.t, str(work / "curated" / "c-%04d.tar"),
                 seed=0, workers=a.workers, max_count=1000)
    print(cur, flush=True)
    rnd_counts = random_subset(work / "pool", work / "random", cur.kept, seed=0)
    counts = {"pool": pool_counts, "curated": colour_counts(work / "curated"), "random": rnd_counts}
    runs: dict[str, list[dict]] = {"curated": [], "random": []}
    for seed in a.seeds:
        for arm in runs:
            run = work / f"{arm}-s{seed}"
            if a.reuse and (run / "checkpoints").is_dir():  # the subsets are deterministic: the same run
                r = {"wall_s": None}
            else:
                r = train_recipe("clip-tiny", run, data, a.steps,
                                 [f"data.sources=[{work / arm}]", f"data.batch_size={a.batch}",
                                  "data.shuffle_buffer=1000", f"seed={seed}",
                                  f"optim.warmup_steps={max(1, a.steps // 10)}"], a.threads)
            runs[arm].append({"seed": seed, **evaluate(run, data), "wall_s": r["wall_s"]})
            print(f"{arm} seed {seed}: tail colour top-1 {runs[arm][-1]['tail_color_top1']:.3f} "
                  f"({r['wall_s'] or 0:.0f} s)", flush=True)
    keys = ("tail_color_top1", "head_color_top1", "color_top1", "shape_top1")
    print()
    print_table(["arm", "seed", "samples", "tail-colour samples", *keys],
                [[arm, r["seed"], cur.kept, sum(v for c, v in counts[arm].items() if c not in HEAD), *[r[k] for k in keys]]
                 for arm, rs in runs.items() for r in rs])
    import statistics

    summary = {arm: {k: {"mean": statistics.mean(r[k] for r in rs),
                         "sd": statistics.stdev(r[k] for r in rs) if len(rs) > 1 else None} for k in keys}
               for arm, rs in runs.items()}
    tail_n = runs["curated"][0]["n"] * (1 - len(HEAD) / 10)  # the eval split is balanced over colours
    se = {arm: (lambda p: (p * (1 - p) / tail_n) ** 0.5)(summary[arm]["tail_color_top1"]["mean"]) for arm in runs}
    wins = sum(c["tail_color_top1"] > r["tail_color_top1"] for c, r in zip(runs["curated"], runs["random"], strict=True))
    print(f"\ncurated > random on tail-colour zero-shot in {wins} of {len(a.seeds)} seed(s): "
          f"{summary['curated']['tail_color_top1']['mean']:.3f} vs {summary['random']['tail_color_top1']['mean']:.3f} "
          f"(~{tail_n:.0f} tail-colour eval samples; binomial s.e. {se['curated']:.3f} / {se['random']:.3f}; "
          f"seed sd {summary['curated']['tail_color_top1']['sd']} / {summary['random']['tail_color_top1']['sd']})")
    result = {"settings": {"t": a.t, "steps": a.steps, "batch": a.batch, "seeds": a.seeds, "skew": SKEW, "head": HEAD,
                           "train_samples": a.train_samples, "data_seed": 0, "threads": a.threads},
              "pool_samples": cur.samples, "matched": cur.matched, "subset_size": cur.kept, "counts": counts,
              "runs": runs, "summary": summary, "curated_wins": wins, "tail_binomial_se": se}
    png = plot(result, RESULTS / f"{NAME}.png")
    shutil.copy(cur.plot_file, RESULTS / f"{NAME}_entries.png")
    out = write_json(NAME, result)
    print(f"plot: {png} (entry counts: {RESULTS / f'{NAME}_entries.png'})\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
