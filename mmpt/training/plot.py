"""``loss.png`` of a run: raw and smoothed loss curves, and eval metrics over steps when there are any."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpt.training.logger import read_jsonl


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's debiased exponential moving average (the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def headline(metric: str) -> bool:
    """Eval metrics worth a curve: top-1 accuracies, recall@1 and caption accuracies, not chance levels or counts."""
    return metric.endswith(("top1", "_r1", "_acc")) and "chance" not in metric


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_run(run_dir: str | Path) -> Path | None:
    """Write ``run_dir/loss.png`` from ``metrics.jsonl``; None when there is nothing to plot."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    recs = read_jsonl(path)
    train = [r for r in recs if r.get("kind") == "train"]
    losses = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
    evals = [(r["kind"].removeprefix("eval/"), r) for r in recs if str(r.get("kind", "")).startswith("eval/")]
    curves = sorted({(task, k) for task, r in evals for k in r if headline(k)})
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4), squeeze=False)
    ax = axes[0][0]
    for i, key in enumerate(losses):
        steps, values = _series(train, key)
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.3, lw=0.8)
        ax.plot(steps, smooth(values), color=color, lw=1.8 if key == "loss" else 1.2, label=f"{key} (smoothed)")
    ax.set(xlabel="step", ylabel="loss", title=f"{Path(run_dir).name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if curves:
        ax = axes[0][1]
        for task, metric in curves:
            steps, values = _series([r for t, r in evals if t == task], metric)
            ax.plot(steps, values, marker="o", ms=3, label=f"{task} {metric}")
        ax.set(xlabel="step", ylabel="metric", title="eval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
