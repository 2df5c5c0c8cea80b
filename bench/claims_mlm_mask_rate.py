"""Seed claim (Wettig et al. 2023, "Should You Mask 15% in Masked Language Modeling?"): masking 40% is at least
as good as 15% for downstream linear-probe accuracy at equal steps.

One command trains ``esm-mlm-tiny`` (protein MLM on the demo proteins) at each masking rate for the same number
of steps (same seed, data order and schedule; only ``objectives.mlm.rate`` differs), then fits linear probes of
the mean-pooled protein embedding on the demo's labels (held-out split; probes fitted on one training shard) and
scores the untrained tower too: shape and colour are the claim's labels, but the demo proteins make them readable
from residue composition alone, so the untrained row shows where they start; position (where the motif sits)
and size (the sequence's length) need context. Prints a table, draws ``bench/results/claims_mlm_mask_rate.png``
and writes the JSON next to it.

    .venv/bin/python bench/claims_mlm_mask_rate.py                 # 2 runs of 300 steps
    .venv/bin/python bench/claims_mlm_mask_rate.py --steps 100 --rates 0.15 0.4 0.6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import add_run_args, print_table, train_recipe, write_json  # noqa: E402
from common import MMPT, RESULTS, run_logged, thread_env  # noqa: E402

NAME = "claims_mlm_mask_rate"
RECIPE = "esm-mlm-tiny"
LABELS = ("shape", "color", "size", "position")


def ensure_protein_demo(data: Path, threads: int) -> None:
    """``mmpt data demo --modalities protein,text`` into ``data`` unless it is there."""
    if not (data / "info.json").exists():
        run_logged([str(MMPT), "data", "demo", "--out", str(data), "--modalities", "protein,text"],
                   data.parent / "demo-data.log", thread_env(threads))


def untrained(recipe: str, data: Path) -> tuple[Any, dict]:
    """The recipe's model at step 0 (seeded as ``mmpt train`` seeds rank 0) and its data sides."""
    import os

    from mmpt.config import load_config, recipe_path
    from mmpt.pretrainer import build_data_specs, build_pretrainer, set_seed

    os.environ["MMPT_DEMO_DATA"] = str(data)
    cfg = load_config(recipe_path(recipe))
    set_seed(cfg.seed)
    return build_pretrainer(cfg).eval(), build_data_specs(cfg)


def probe_scores(model: Any, specs: dict, data: Path) -> dict[str, float]:
    """Held-out linear-probe top-1 of the protein embedding for each label; each split is embedded once."""
    from mmpt.eval.common import embed_data, label_indices, sample_labels
    from mmpt.eval.linear_probe import probe_metrics

    splits = {"train": str(data / "train" / sorted(p.name for p in (data / "train").glob("*.tar"))[0]),
              "test": str(data / "eval" / "*.tar")}
    embedded = {s: embed_data(model.model, specs, pattern, 256, keep=("json",), progress=False, modality="protein")
                for s, pattern in splits.items()}
    out = {}
    for label in LABELS:
        names = {s: sample_labels(e, label) for s, e in embedded.items()}
        classes = sorted({n for n in names["train"] if n is not None})
        y = {s: label_indices(n, classes)[0] for s, n in names.items()}
        rows = {s: y[s] >= 0 for s in y}
        m = probe_metrics(embedded["train"].embeddings[rows["train"]], y["train"][rows["train"]],
                          embedded["test"].embeddings[rows["test"]], y["test"][rows["test"]], classes, 1e-4, 300)
        out[label] = float(m["top1"])
        out[f"{label}_chance"] = 1 / len(classes)
    return out


def plot(rows: list[dict], out: Path) -> Path:
    """Probe top-1 per label, one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(LABELS))], [r[k] for k in LABELS], width, label=r["model"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(LABELS))], labels=list(LABELS))
    ax.set_ylabel("held-out linear-probe top-1")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"protein MLM masking rate, {rows[-1]['steps']} steps each ({RECIPE})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/mlm-mask-rate")
    p.set_defaults(data="runs/demo/data-protein")
    p.add_argument("--rates", type=float, nargs="+", default=[0.15, 0.4], help="masking rates to compare")
    p.add_argument("--batch", type=int, default=128, help="batch size of every run")
    a = p.parse_args()
    from mmpt.commands.export import load

    data, work = Path(a.data), Path(a.work)
    ensure_protein_demo(data, a.threads)
    model, specs = untrained(RECIPE, data)
    rows = [{"model": "untrained", "rate": None, "steps": 0, **probe_scores(model, specs, data)}]
    for rate in a.rates:
        run_dir = work / f"rate{rate:g}"
        run = train_recipe(RECIPE, run_dir, data, a.steps, [f"objectives.mlm.rate={rate}", f"data.batch_size={a.batch}"],
                           a.threads)
        model, specs, _ = load(run_dir)
        rows.append({"model": f"mlm {rate:.0%}", "rate": rate, "steps": a.steps, **probe_scores(model, specs, data),
                     **run})
        print(", ".join(f"{k} {rows[-1][k]:.3f}" for k in LABELS) + f" ({rows[-1]['model']}, {run['wall_s']:.0f} s)",
              flush=True)
    print()
    print_table(["model", *LABELS, "train s"], [[r["model"], *[r[k] for k in LABELS], f"{r.get('wall_s', 0):.0f}"]
                                                for r in rows])
    base = next(r for r in rows if r["rate"] == 0.15) if 0.15 in a.rates else None
    verdicts = {}
    if base is not None:
        for r in rows:
            if r["rate"] not in (None, 0.15):
                verdicts[r["model"]] = {k: r[k] >= base[k] for k in LABELS}
                print(f"{r['model']} >= 15% on {sum(verdicts[r['model']].values())} of {len(LABELS)} labels")
    png = plot(rows, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"recipe": RECIPE, "steps": a.steps, "rates": a.rates, "batch": a.batch,
                                         "threads": a.threads, "seed": 0, "labels": LABELS}, "rows": rows,
                            "ge_15": verdicts})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
