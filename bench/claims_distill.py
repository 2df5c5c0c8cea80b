"""Claim (distillation, as in OpenCLIP's DistillClipLoss / MetaCLIP 2): a half-width student distilled from
``clip-tiny``'s export beats the same student trained alone at equal steps.

One command trains the teacher (``clip-tiny`` as shipped, or ``--teacher FILE`` to reuse an export), then the
half-width student (image channels and text width halved, same data, schedule and steps) with ``clip`` alone
and with ``clip`` + ``distill`` from the frozen teacher, for each seed; evaluates all on the held-out demo split
(zero-shot colour and shape top-1, retrieval R@1), prints a table with the spread over seeds, draws
``bench/results/claims_distill.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_distill.py                     # teacher 1000 steps, students 300 x 2 seeds
    .venv/bin/python bench/claims_distill.py --teacher runs/demo/model.safetensors --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import (  # noqa: E402
    add_run_args,
    demo_eval,
    ensure_demo_data,
    grouped_bars,
    print_table,
    train_recipe,
    write_json,
)
from common import RESULTS  # noqa: E402

NAME = "claims_distill"
METRICS = ("color_top1", "shape_top1", "i2t_r1", "t2i_r1")
# Half of clip-tiny's towers: ResNet channels and stem, text width (and heads, to keep 32-wide heads).
HALF_WIDTH = ["model.encoders.image.model_kwargs={channels: [16, 32, 64, 128], stem_width: 8}",
              "model.encoders.text.width=64", "model.encoders.text.heads=2"]


def distill_sets(teacher: Path, kd_weight: float, feature_weight: float) -> list[str]:
    """clip-tiny's clip objective plus distill from the frozen teacher export."""
    return [f"objectives.distill={{name: distill, teachers: ['{teacher}'], pairs: [[image, text]], "
            f"kd_weight: {kd_weight}, feature_weight: {feature_weight}}}"]


def plot(rows: list[dict], out: Path) -> Path:
    """Mean held-out metric per student, with the per-seed values as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(dict.fromkeys(r["student"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    grouped_bars(ax, list(METRICS), {s: [statistics.mean(r[m] for r in rows if r["student"] == s) for m in METRICS]
                                    for s in students})
    width = 0.8 / len(students)
    for j, s in enumerate(students):
        for i, m in enumerate(METRICS):
            vals = [r[m] for r in rows if r["student"] == s]
            ax.scatter([i + j * width] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_title(f"half-width student, {rows[0]['steps']} steps: alone vs distilled from clip-tiny (held-out)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/distill")
    p.add_argument("--teacher", help="an existing clip-tiny export to distil from (default: train one)")
    p.add_argument("--teacher-steps", type=int, default=1000, help="steps of the teacher run (clip-tiny's own)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--feature-weight", type=float, default=1.0)
    a = p.parse_args()
    from mmpt.commands.export import export, load

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    teacher_row = {}
    if a.teacher:
        teacher = Path(a.teacher)
    else:
        run = train_recipe("clip-tiny", work / "teacher", data, a.teacher_steps, [], a.threads)
        teacher = export(work / "teacher", work / "teacher.safetensors")
        teacher_row = {"wall_s": run["wall_s"]}
    model, transforms, _ = load(teacher)
    teacher_scores, chance = demo_eval(model, transforms, data)
    print("teacher: " + ", ".join(f"{k} {teacher_scores[k]:.3f}" for k in METRICS), flush=True)
    rows = []
    for seed in a.seeds:
        for student, extra in (("alone", []), ("distilled", distill_sets(teacher.resolve(), a.kd_weight,
                                                                        a.feature_weight))):
            run_dir = work / f"{student}-s{seed}"
            sets = [*HALF_WIDTH, *extra, f"seed={seed}", f"optim.warmup_steps={max(1, a.steps // 10)}"]
            run = train_recipe("clip-tiny", run_dir, data, a.steps, sets, a.threads)
            model, transforms, _ = load(run_dir)
            scores, _ = demo_eval(model, transforms, data)
            row = {"student": student, "seed": seed, "steps": a.steps, **scores, **run}
            print(f"{student:9s} seed {seed}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS)
                  + f" ({run['wall_s']:.0f} s)", flush=True)
            rows.append(row)
    print()
    summary = {}
    for student in ("alone", "distilled"):
        mine = [r for r in rows if r["student"] == student]
        summary[student] = {m: {"mean": statistics.mean(r[m] for r in mine),
                                "spread": max(r[m] for r in mine) - min(r[m] for r in mine)} for m in METRICS}
    print_table(["student", *METRICS],
                [[s, *[f"{summary[s][m]['mean']:.3f} ±{summary[s][m]['spread'] / 2:.3f}" for m in METRICS]]
                 for s in summary] + [["teacher", *[teacher_scores[m] for m in METRICS]]])
    wins = [m for m in METRICS if summary["distilled"][m]["mean"] > summary["alone"][m]["mean"]]
    print(f"\ndistilled > alone (mean over {len(a.seeds)} seeds) in {len(wins)} of {len(METRICS)} metrics: "
          f"{', '.join(wins) or 'none'} (chance: {', '.join(f'{k} {v:.4f}' for k, v in chance.items())})")
    png = plot(rows, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"steps": a.steps, "teacher": str(teacher), "teacher_steps": a.teacher_steps,
                                         "seeds": a.seeds, "half_width": HALF_WIDTH, "kd_weight": a.kd_weight,
                                         "feature_weight": a.feature_weight, "threads": a.threads},
                            "teacher": {**teacher_scores, **teacher_row}, "chance": chance, "rows": rows,
                            "summary": summary, "distilled_wins": wins})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
