"""Claim (SigLIP 2, Tschannen et al. 2025): at equal wall time, ``siglip2-tiny`` (siglip + LocCa captioning +
SILC + TIPS from an EMA teacher) beats ``siglip-tiny`` alone on held-out zero-shot and on a patch-level probe;
each added objective's share is shown by ablation.

One command:
1. writes patch-labelled copies of demo shards: each 8 px patch of the 48 px eval view gets the colour it shows
   (``patch_color``: the shape's colour where the shape covers at least half the patch, else the background's)
   and, on shape patches, the shape's name (``patch_shape``; other patches unscored);
2. times one training step (forward, backward, AdamW) of each variant back to back in this process and gives
   each the number of steps that fits the wall-time budget of ``--base-steps`` siglip-tiny steps;
3. trains siglip-tiny, siglip2-tiny, siglip2-tiny without each of caption / SILC / TIPS, and siglip-tiny at
   siglip2-tiny's step count (the equal-steps reference), one process each;
4. evaluates each on the held-out split: zero-shot colour and shape top-1, retrieval R@1, and the ``token_probe``
   task on the image tower's patch tokens (a logistic probe fitted on train-split patches, scored on held-out
   ones; shape reported as mean per-class top-1), prints a table, draws ``bench/results/claims_siglip2.png`` and
   writes the JSON next to it.

    .venv/bin/python bench/claims_siglip2.py                      # budget of 300 siglip-tiny steps
    .venv/bin/python bench/claims_siglip2.py --base-steps 100 --variants siglip siglip2
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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

NAME = "claims_siglip2"
PATCH = 8  # the ViT's patch side at the recipes' 48 px input
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "siglip": ("siglip-tiny", []),
    "siglip2": ("siglip2-tiny", []),
    "siglip2 -caption": ("siglip2-tiny", []),  # the caption objective removed (see without())
    "siglip2 -silc": ("siglip2-tiny", ["objectives.self_distill.local_weight=0.0", "model.encoders.image.train_views=1"]),
    "siglip2 -tips": ("siglip2-tiny", ["objectives.self_distill.masked_weight=0.0"]),
}
# An objective weighted 0 would still cost its compute: this ablation drops it instead.
DROP = {"siglip2 -caption": "caption"}


def without(recipe: str, objective: str) -> list[str]:
    """An override setting the recipe's objectives minus ``objective`` (JSON is YAML flow)."""
    from mmpt.config import load_config

    kept = {k: v for k, v in load_config(recipe).objectives.items() if k != objective}
    return [f"objectives={json.dumps(kept)}"]
METRICS = ("color_top1", "shape_top1", "i2t_r1", "t2i_r1", "patch_color", "patch_shape")


def patch_labels(pixels, color: str, background: str, shape: str) -> tuple[list[str], list[str | None]]:
    """Per patch (row-major, as the ViT's tokens) of a (3, S, S) uint8 eval view: the colour it shows and, where
    the shape covers at least half of it, the shape's name (else None: not scored)."""
    import torch

    from mmpt.data.concepts import COLORS

    x = pixels.float().permute(1, 2, 0)  # (S, S, 3)
    fg, bg = torch.tensor(COLORS[color], dtype=torch.float32), torch.tensor(COLORS[background], dtype=torch.float32)
    covered = ((x - fg).square().sum(-1) < (x - bg).square().sum(-1)).float()
    g = covered.shape[0] // PATCH
    share = covered.reshape(g, PATCH, g, PATCH).mean((1, 3)).flatten()
    return ([color if s >= 0.5 else background for s in share.tolist()],
            [shape if s >= 0.5 else None for s in share.tolist()])


def write_patch_shards(src: list[Path], out: Path, limit: int, image_size: int = 48) -> str:
    """Copies of up to ``limit`` samples of ``src`` shards with per-patch labels added to their json; returns
    the shard path pattern the eval task reads."""
    import tarfile

    from mmpt.data.writer import ShardWriter
    from mmpt.registry import modalities

    done = out / "done"
    if done.exists():
        return done.read_text()
    out.mkdir(parents=True, exist_ok=True)
    side = modalities.get("image")(image_size=image_size)
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for shard in src:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if key not in samples:
                    if len(order) == limit:
                        break
                    order.append(key)
                    samples[key] = {}
                samples[key][ext] = tar.extractfile(m).read()
        if len(order) == limit and all(len(samples[k]) == 3 for k in order):
            break
    with ShardWriter(str(out / "patches-%06d.tar")) as w:
        for key in order:
            s = samples[key]
            meta = json.loads(s["json"])
            view = side.transform(side.decode(s["jpg"], "jpg"), train=False)
            meta["patch_color"], meta["patch_shape"] = patch_labels(view, meta["color"], meta["background"],
                                                                    meta["shape"])
            w.write(key, {"jpg": s["jpg"], "txt": s["txt"], "json": json.dumps(meta)})
    pattern = "::".join(str(p) for p in w.shards)
    done.write_text(pattern)
    return pattern


def step_seconds(recipe: str, sets: list[str], captions: list[str], threads: int, repeats: int = 3) -> float:
    """Median wall seconds of one training step (forward, backward, AdamW) of the variant on a batch of
    synthetic pixels and real demo captions, in this process."""
    import torch

    from mmpt.config import load_config
    from mmpt.contracts import Batch
    from mmpt.pretrainer import build_pretrainer

    torch.set_num_threads(threads)
    cfg = load_config(recipe, sets)
    model = build_pretrainer(cfg).train()
    from mmpt.training.engine import resolve_precision

    # what `mmpt train` runs with precision auto here (bf16 autocast on CPUs with native bf16)
    bf16 = resolve_precision(cfg.train.precision, torch.device("cpu")) == "bf16"
    model.set_autocast("cpu", torch.bfloat16 if bf16 else None)
    b = cfg.data.batch_size
    views = int(cfg.model.encoders["image"].get("train_views", 1))
    size = int(cfg.model.encoders["image"]["image_size"])
    pixels = {("pixels" if k == 0 else f"pixels@view{k}"): torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
              for k in range(views)}
    text = model.model.data["text"].prepare([captions[i % len(captions)] for i in range(b)])
    ones = torch.ones(b, dtype=torch.bool)
    batch = Batch(fields={"image": pixels, "text": text}, present={"image": ones, "text": ones},
                  keys=[str(i) for i in range(b)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def demo_captions(shard: Path, n: int = 256) -> list[str]:
    """The first ``n`` captions of a demo shard (what a training batch's text looks like)."""
    import tarfile

    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")][:n]


def patch_tasks(train: str, test: str) -> list[dict]:
    """token_probe on the image tower's patch tokens (after its CLS token)."""
    return [{"name": "token_probe", "data": test, "train_data": train, "label_key": key, "modality": "image",
             "token_offset": 1, "max_iter": 200} for key in ("patch_color", "patch_shape")]


def plot(rows: list[dict], out: Path) -> Path:
    """One group of bars per held-out metric, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    grouped_bars(ax, list(METRICS), {f"{r['variant']} ({r['steps']} st)": [r[m] for m in METRICS] for r in rows},
                 fontsize=8)
    equal = "equal steps" if all(r["equal"] == "steps" for r in rows) else "equal wall time"
    ax.set_title(f"siglip2-tiny vs siglip-tiny at {equal} (held-out demo split)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/siglip2")
    p.add_argument("--base-steps", type=int, default=None, help="siglip-tiny steps that set the wall-time budget "
                   "(default: --steps)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (results depend on steps only)")
    p.add_argument("--equal-steps", type=int, default=None, help="instead: train the variants for this many steps "
                   "each, no wall-time budget (writes claims_siglip2_equal_steps.*)")
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs of the same variant and steps "
                   "in --work instead of training them again")
    p.add_argument("--probe-samples", type=int, default=1000, help="images per patch-probe split")
    a = p.parse_args()
    import os

    from mmpt.commands.export import load
    from mmpt.eval import run_tasks

    base = a.base_steps or a.steps
    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    train_patches = write_patch_shards(sorted((data / "train").glob("*.tar"))[-1:], work / "patches-train",
                                       a.probe_samples)
    test_patches = write_patch_shards(sorted((data / "eval").glob("*.tar")), work / "patches-eval", a.probe_samples)
    captions = demo_captions(sorted((data / "eval").glob("*.tar"))[0])
    sets_of = {v: [*VARIANTS[v][1], *(without(VARIANTS[v][0], DROP[v]) if v in DROP else [])] for v in a.variants}
    name = NAME
    if a.equal_steps:
        name, seconds, budget = f"{NAME}_equal_steps", {v: math.nan for v in a.variants}, math.nan
        runs = [(v, a.equal_steps, "steps") for v in a.variants]
    else:
        seconds = {v: step_seconds(VARIANTS[v][0], sets_of[v], captions, a.threads) for v in a.variants}
        budget = base * seconds.get("siglip", seconds[a.variants[0]])
        steps = {v: max(20, round(budget / s)) for v, s in seconds.items()}
        runs = [(v, steps[v], "wall") for v in a.variants]
        if "siglip" in a.variants and "siglip2" in a.variants:
            runs.append(("siglip", steps["siglip2"], "steps"))  # equal steps: what each step of siglip2 buys
        print("step seconds: " + ", ".join(f"{v} {s:.2f}" for v, s in seconds.items())
              + f"; budget {budget:.0f} s of compute per run", flush=True)
    def trained(job: tuple[str, int, str]) -> tuple[Path, dict]:
        variant, n, _ = job
        run_dir = work / f"{variant.replace(' ', '').replace('-', '_no_')}-{n}"
        sets = [*sets_of[variant], f"optim.warmup_steps={max(1, min(20, n // 10))}"]
        log = run_dir.parent / f"{run_dir.name}.log"
        if a.reuse and (run_dir / "checkpoints" / f"step_{n:08d}").is_dir() and log.is_file():
            wall = re.search(r"done: \d+ steps in (\d+) s", log.read_text(errors="replace"))
            return run_dir, {"wall_s": float(wall.group(1)) if wall else math.nan, "summary": "reused"}
        return run_dir, train_recipe(VARIANTS[variant][0], run_dir, data, n, sets, a.threads)

    # the runs' results depend on their step counts only, so they may share the machine (--jobs)
    with ThreadPoolExecutor(a.jobs) as pool:
        done = list(pool.map(trained, runs))
    rows, chance = [], {}
    for (variant, n, equal), (run_dir, run) in zip(runs, done, strict=True):
        model, transforms, _ = load(run_dir)
        scores, chance = demo_eval(model, transforms, data)
        probe = run_tasks(model.model, transforms, patch_tasks(train_patches, test_patches), device="cpu",
                          progress=False)
        scores["patch_color"] = probe["token_probe/patch_color"]["top1"]
        scores["patch_shape"] = probe["token_probe/patch_shape"]["mean_per_class_top1"]
        chance.update(patch_color=probe["token_probe/patch_color"]["chance"],
                      patch_shape=probe["token_probe/patch_shape"]["chance"])
        row = {"variant": variant, "steps": n, "equal": equal, "step_s": round(seconds[variant], 3), **scores, **run}
        print(f"{variant:17s} {n:4d} steps: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS)
              + f" ({run['wall_s']:.0f} s)", flush=True)
        rows.append(row)
    print()
    print_table(["variant", "steps", "equal", *METRICS, "train s"],
                [[r["variant"], r["steps"], r["equal"], *[r[k] for k in METRICS], f"{r['wall_s']:.0f}"] for r in rows])
    print(f"chance: {', '.join(f'{k} {v:.4f}' for k, v in chance.items())}; load {os.getloadavg()}")
    png = plot(rows, RESULTS / f"{name}.png")
    out = write_json(name, {"settings": {"base_steps": base, "variants": {v: VARIANTS[v] for v in a.variants},
                                         "drop": DROP, "threads": a.threads, "jobs": a.jobs, "probe_samples": a.probe_samples,
                                         "step_seconds": seconds, "budget_s": budget, "seed": 0},
                            "chance": chance, "rows": rows, "loadavg": os.getloadavg()})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
