"""Seed claim ("dynamic masking"): a masking rate decaying 30% -> 15% over training reaches a target masked-LM
loss in fewer steps than a constant 15%.

One command trains ``esm-mlm-tiny`` twice for the same steps (same seed, data order and lr schedule): constant
15%, and linear 30% -> 15% over all steps. Every ``--every`` steps a checkpoint is scored on the held-out split at
a fixed 15% with the same masks for every checkpoint (a fixed seed; eval-mode ``mlm`` masks at its end rate).
The target is the held-out loss the constant run reaches at ``--target-at`` of its steps (or ``--target``);
steps-to-target are read off each curve, interpolated between checkpoints. Prints a table, draws
``bench/results/claims_mlm_schedule.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_mlm_schedule.py                  # 2 runs of 300 steps
    .venv/bin/python bench/claims_mlm_schedule.py --steps 120 --every 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import add_run_args, print_table, train_recipe, write_json  # noqa: E402
from claims_mlm_mask_rate import RECIPE, ensure_protein_demo, untrained  # noqa: E402
from common import RESULTS  # noqa: E402

NAME = "claims_mlm_schedule"
EVAL_SEED = 1234


def schedules(steps: int) -> dict[str, list[str]]:
    """The two runs' overrides: constant 15%, and linear 30% -> 15% over every step."""
    return {"constant 15%": ["objectives.mlm.rate=0.15"],
            "30% -> 15%": ["objectives.mlm.rate=0.15", "objectives.mlm.schedule=linear", "objectives.mlm.rate_start=0.3",
                           f"objectives.mlm.schedule_steps={steps}"]}


def heldout_loss(model: Any, specs: dict, data: Path, batch_size: int = 256) -> float:
    """Masked-LM loss per selected token over the held-out split, masks drawn at the model's end rate from a
    fixed seed (the same masks for every checkpoint of the same recipe)."""
    import torch

    from mmpt.data.loader import eval_loader

    mlm = model.objectives["mlm"]
    model.eval()
    total, count = 0.0, 0.0
    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        for batch in eval_loader(str(data / "eval" / "*.tar"), specs, batch_size, workers=0):
            out = mlm({}, batch, model.model)
            total += float(out.loss) * float(out.metrics["masked"])
            count += float(out.metrics["masked"])
    return total / max(count, 1.0)


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where the curve reaches ``target``, interpolated linearly between checkpoints; None if never."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return float(s1) if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def plot(curves: dict[str, list[tuple[int, float]]], target: float, out: Path) -> Path:
    """Held-out loss against steps, one line per run, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", ms=3, label=name)
    ax.axhline(target, ls="--", c="gray", lw=1, label=f"target {target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out masked-LM loss (15%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"masking schedule, {RECIPE}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/mlm-schedule")
    p.set_defaults(data="runs/demo/data-protein")
    p.add_argument("--every", type=int, default=25, help="steps between scored checkpoints")
    p.add_argument("--batch", type=int, default=128, help="batch size of every run")
    p.add_argument("--target", type=float, default=None, help="target held-out loss (default: see --target-at)")
    p.add_argument("--target-at", type=float, default=0.5,
                   help="without --target: the constant run's loss at this fraction of its steps")
    a = p.parse_args()
    from mmpt.commands.export import load

    data, work = Path(a.data), Path(a.work)
    ensure_protein_demo(data, a.threads)
    model, specs = untrained(RECIPE, data)
    start = heldout_loss(model, specs, data)
    curves, walls = {}, {}
    for name, sets in schedules(a.steps).items():
        run_dir = work / name.replace(" ", "").replace("%", "").replace("->", "-")
        run = train_recipe(RECIPE, run_dir, data, a.steps, [*sets, f"data.batch_size={a.batch}",
                                                            f"train.checkpoint_every={a.every}", "train.keep_last=1000"],
                           a.threads)
        walls[name] = run["wall_s"]
        curve = [(0, start)]
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
            model, specs, _ = load(ckpt)
            curve.append((int(ckpt.name.removeprefix("step_")), heldout_loss(model, specs, data)))
        curves[name] = curve
        print(f"{name}: " + ", ".join(f"{s}:{v:.3f}" for s, v in curve) + f" ({run['wall_s']:.0f} s)", flush=True)
    base = curves["constant 15%"]
    target = a.target if a.target is not None else _loss_at(base, a.target_at * a.steps)
    reach = {name: steps_to(curve, target) for name, curve in curves.items()}
    # a second target, the constant run's final loss: how much sooner the schedule gets where 15% ends
    reach_final = {name: steps_to(curve, base[-1][1]) for name, curve in curves.items()}
    print()
    print_table(["run", "steps to target", "steps to 15%'s final loss", "final loss", "train s"],
                [[n, _steps(reach[n]), _steps(reach_final[n]), c[-1][1], f"{walls[n]:.0f}"] for n, c in curves.items()])
    print(f"target held-out loss {target:.3f}; untrained {start:.3f}")
    png = plot(curves, target, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"recipe": RECIPE, "steps": a.steps, "every": a.every, "batch": a.batch,
                                         "threads": a.threads, "seed": 0, "eval_seed": EVAL_SEED,
                                         "runs": schedules(a.steps)},
                            "target": target, "steps_to_target": reach, "steps_to_constant_final": reach_final,
                            "curves": curves, "train_s": walls})
    print(f"plot: {png}\nresults: {out}")
    return 0


def _steps(step: float | None) -> str:
    return "never" if step is None else f"{step:.0f}"


def _loss_at(curve: list[tuple[int, float]], step: float) -> float:
    """The curve's loss at ``step``, interpolated between checkpoints."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / max(s1 - s0, 1)
    return curve[-1][1]


if __name__ == "__main__":
    sys.exit(main())
