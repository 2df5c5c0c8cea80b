"""Claim (model soups, Wortsman et al. 2022): a greedy soup of fine-tunes of one init is at least as good as the
best single fine-tune, on held-out data and under a distribution shift.

One command: pretrains ``clip-tiny`` on the demo data (every background colour), exports it, fine-tunes it
with ``model.init_from`` several times (different lr and seeds) on the samples whose background is one of five
colours, builds the uniform soup and the greedy soup (``mmpt soup --greedy``, ranked on a validation split of
those backgrounds), then scores every model on a held-out test split of the same backgrounds and on a shifted
split whose backgrounds the fine-tunes never saw (zero-shot colour and shape top-1, their mean). Prints a table,
draws ``bench/results/claims_soups.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_soups.py                      # ~25 min on 2 cores under load 15
    .venv/bin/python bench/claims_soups.py --base-steps 200 --steps 80
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import DEMO_TASKS, print_table, train_recipe, write_json  # noqa: E402
from common import RESULTS, demo_data  # noqa: E402

NAME = "claims_soups"
SEEN = ("red", "green", "blue", "yellow", "cyan")  # backgrounds of the fine-tuning data; the rest is the shift
FINETUNES = ((1e-4, 0), (3e-4, 0), (3e-4, 1), (1e-3, 0), (1e-3, 1))  # (lr, seed)
SPLITS = ("val", "test", "shifted")


def split_data(data: Path) -> dict[str, Path]:
    """Fine-tuning shards (train samples on a SEEN background) and the val/test/shifted eval shards."""
    from mmpt.data.shards import ShardEvent, iter_samples
    from mmpt.data.writer import ShardWriter

    out = {name: data / "splits" / name for name in ("finetune", *SPLITS)}
    writers = {name: ShardWriter(str(folder / f"{name}-%04d.tar"), max_count=5000) for name, folder in out.items()}

    def copy(folder: str, route) -> None:  # noqa: ANN001
        for shard in sorted((data / folder).glob("*.tar")):
            for i, s in enumerate(iter_samples(str(shard))):
                if isinstance(s, ShardEvent) or s.get("__cut__"):
                    continue
                name = route(json.loads(s["json"])["background"], i)
                if name:
                    writers[name].write(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})

    copy("train", lambda bg, i: "finetune" if bg in SEEN else None)
    copy("eval", lambda bg, i: ("val" if i % 2 == 0 else "test") if bg in SEEN else "shifted")
    for w in writers.values():
        w.close()
    return out


def tasks_for(split: Path, data: Path) -> list[dict]:
    """Zero-shot colour and shape on one split with the demo's class names and prompts."""
    return [{"name": "zero_shot", "data": str(split), "label_key": k, "classnames": str(data / "classes" / f"{k}.txt"),
             "templates": str(data / "templates" / f"{k}.txt")} for k in DEMO_TASKS]


def score(path: Path, splits: dict[str, Path], data: Path) -> dict[str, float]:
    """Zero-shot top-1 (colour, shape, mean) of an export on every split, and the split sizes."""
    import mmpt
    from mmpt.eval import run_tasks

    model, transforms, _ = mmpt.load(str(path))
    out: dict[str, float] = {}
    for split in SPLITS:
        res = run_tasks(model.model, transforms, tasks_for(splits[split], data), device="cpu", progress=False)
        for k in DEMO_TASKS:
            out[f"{split}_{k}"] = res[f"zero_shot/{k}"]["top1"]
        out[split] = sum(out[f"{split}_{k}"] for k in DEMO_TASKS) / len(DEMO_TASKS)
        out[f"{split}_n"] = res[f"zero_shot/{DEMO_TASKS[0]}"]["n"]
    return out


def plot(rows: list[dict], out: Path) -> Path:
    """Mean zero-shot top-1 of each model on the test and shifted splits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    best = max((r for r in rows if r["kind"] == "fine-tune"), key=lambda r: r["val"])
    for ax, split in zip(axes, ("test", "shifted"), strict=True):
        names = [r["model"] for r in rows]
        values = [r[split] for r in rows]
        errs = [r[f"{split}_se"] for r in rows]
        colors = ["#888888" if r["kind"] == "fine-tune" else "#d62728" if r["model"] == "greedy soup" else "#1f77b4"
                  for r in rows]
        ax.bar(np.arange(len(rows)), values, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(np.arange(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{split} split (mean of colour and shape zero-shot top-1)", fontsize=9)
        ax.axhline(best[split], color="black", linestyle="--", linewidth=1, label=f"best single by val ({best['model']})")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, min(1, max(values) + 0.08))
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Model soups of clip-tiny fine-tunes (error bars: binomial s.e. of the mean of the two tasks)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/claims/soups", help="folder for data and runs")
    p.add_argument("--base-steps", type=int, default=400, help="pretraining steps of the shared init")
    p.add_argument("--steps", type=int, default=100, help="steps of each fine-tune")
    p.add_argument("--reuse", action="store_true", help="keep the exports already in --work (base and fine-tunes)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=12000)
    p.add_argument("--eval-samples", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from mmpt.commands.export import export
    from mmpt.commands.soup import soup

    work = Path(a.work)
    data = work / "data"
    if not (data / "info.json").exists():
        demo_data(data, a.train_samples, a.eval_samples, 64, a.threads)
    splits = split_data(data)
    common = [f"data.batch_size={a.batch}", "data.shuffle_buffer=1000"]
    base_run = work / "base"
    base_file = work / "base.safetensors"
    if not (a.reuse and base_file.exists()):
        base = train_recipe("clip-tiny", base_run, data, a.base_steps,
                            [*common, f"optim.warmup_steps={max(1, a.base_steps // 10)}"], a.threads)
        export(base_run, base_file)
        print(f"base: {a.base_steps} steps in {base['wall_s']:.0f} s", flush=True)
    parts = []
    for lr, seed in FINETUNES:
        run = work / f"ft-lr{lr:g}-s{seed}"
        if a.reuse and (work / f"{run.name}.safetensors").exists():
            parts.append(work / f"{run.name}.safetensors")
            continue
        r = train_recipe("clip-tiny", run, data, a.steps,
                         [*common, f"model.init_from={base_file}", f"data.sources=[{splits['finetune']}]",
                          f"optim.lr={lr}", f"seed={seed}", f"optim.warmup_steps={max(1, a.steps // 10)}"], a.threads)
        parts.append(export(run, work / f"{run.name}.safetensors"))
        print(f"fine-tune lr {lr:g} seed {seed}: {r['wall_s']:.0f} s", flush=True)
    val_tasks = work / "val_tasks.json"
    val_tasks.write_text(json.dumps(tasks_for(splits["val"], data)))
    uniform = soup(parts, work / "uniform-soup.safetensors")
    greedy = soup(parts, work / "greedy-soup.safetensors", greedy_by=val_tasks)
    print(greedy, flush=True)
    models = [("base (init)", "init", base_file)] + [(p.stem, "fine-tune", p) for p in parts] + \
        [("uniform soup", "soup", uniform.out), ("greedy soup", "soup", greedy.out)]
    rows = []
    for name, kind, path in models:
        row = {"model": name, "kind": kind, **score(path, splits, data)}
        for split in SPLITS:  # s.e. of the mean of two top-1s on the same n samples (taken as independent)
            n = max(1, int(row[f"{split}_n"]) or 1)
            row[f"{split}_se"] = math.sqrt(sum(row[f"{split}_{k}"] * (1 - row[f"{split}_{k}"]) for k in DEMO_TASKS)
                                           / n) / len(DEMO_TASKS)
        rows.append(row)
    fts = [r for r in rows if r["kind"] == "fine-tune"]
    best = max(fts, key=lambda r: r["val"])  # the best single model as one would pick it: on validation
    gs = next(r for r in rows if r["model"] == "greedy soup")
    print()
    print_table(["model", *[f"{s} mean" for s in SPLITS], "test colour", "test shape", "shifted colour",
                 "shifted shape"],
                [[r["model"], *[r[s] for s in SPLITS], r["test_color"], r["test_shape"], r["shifted_color"],
                  r["shifted_shape"]] for r in rows])
    claim = {split: {"greedy": gs[split], "best_single_by_val": best[split], "best_single_oracle": max(r[split] for r in fts),
                     "greedy_ge_best": gs[split] >= best[split], "se": gs[f"{split}_se"]} for split in ("test", "shifted")}
    print(f"\nbest single fine-tune by val: {best['model']}; ingredients in the greedy soup: "
          f"{[Path(c).stem for c in greedy.chosen]}")
    for split, c in claim.items():
        print(f"{split}: greedy soup {c['greedy']:.3f} vs best single {c['best_single_by_val']:.3f} "
              f"(oracle best {c['best_single_oracle']:.3f}; s.e. ~{c['se']:.3f}) -> "
              f"{'holds' if c['greedy_ge_best'] else 'does not hold'}")
    png = plot(rows, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"base_steps": a.base_steps, "steps": a.steps, "batch": a.batch,
                                         "finetunes": FINETUNES, "seen_backgrounds": SEEN, "threads": a.threads,
                                         "train_samples": a.train_samples, "eval_samples": a.eval_samples,
                                         "data_seed": 0},
                            "rows": rows, "greedy_ingredients": greedy.chosen, "claim": claim,
                            "ingredient_spread": {s: [min(r[s] for r in fts), max(r[s] for r in fts)] for s in SPLITS}})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
