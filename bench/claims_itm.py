"""Seed claims (UNITER / ALBEF): ITM re-ranking raises retrieval R@1, and hard negatives beat random
negatives for ITM accuracy.

One command trains ``albef-tiny`` (clip + itm) twice with the same towers, data, steps, batch and seed:
``itm.negatives: hard`` (the recipe: one negative per direction ∝ softmax of the step's contrastive
similarity) and ``random`` (uniform over the batch, same identity exclusions). Each model is scored on the
held-out demo split:

- retrieval R@1 both ways by the contrastive embeddings, and after the itm head re-scores each query's
  contrastive top ``--rerank-k`` (the ``retrieval`` task with ``rerank: itm``): by the matching log-odds
  alone (ALBEF, ``_rerank``) and by the log-odds plus the similarity times the run's learnt clip logit scale
  (BLIP adds the similarity; the scale makes both logits, ``_fused``);
- ITM accuracy on held-out pairs: every eval image with its true caption ("a {size} {color} {shape} {where}
  of a {background} background"), five captions that each change one attribute (hard negatives; the set of
  ``claims_filip_fine_grained.py``) and the true caption of another random eval image (an easy negative).
  ``pairwise_hard``: how often the true caption's matched log-odds beat a one-attribute change (chance
  0.5); ``top1_hard``: the true caption scores highest of the six (chance 1/6); ``acc_*``: the head's
  matched/unmatched decision (log-odds > 0) on positives, hard and random negatives; ``balanced``: the mean
  of positive and hard-negative accuracy.

Prints a table, draws ``bench/results/claims_itm.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_itm.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import (  # noqa: E402
    add_run_args,
    ensure_demo_data,
    grouped_bars,
    print_table,
    train_recipe,
    write_json,
)
from claims_filip_fine_grained import ATTRS, fine_grained_set  # noqa: E402
from common import RESULTS  # noqa: E402

from mmpt.eval import run_tasks  # noqa: E402

NAME = "claims_itm"
RECIPE = "albef-tiny"
VARIANTS = {"hard": ["objectives.itm.negatives=hard"], "random": ["objectives.itm.negatives=random"]}


@torch.no_grad()
def itm_scores(model, transforms, images: list[bytes], captions: list[list[str]], seed: int = 0,
               chunk: int = 50) -> np.ndarray:
    """(n_images, 7) itm log-odds of each image with [true caption, 5 one-attribute changes, another image's
    true caption]."""
    rng = np.random.default_rng(seed)
    other = (np.arange(len(images)) + rng.integers(1, len(images), len(images))) % len(images)
    rows = [[*caps, captions[o][0]] for caps, o in zip(captions, other, strict=True)]
    mm, itm = model.model, model.objectives["itm"]
    img_data, txt_data = transforms["image"], transforms["text"]
    out = []
    for lo in range(0, len(images), chunk):
        imgs = img_data.collate([img_data.transform(img_data.decode(b, "jpg"), False) for b in images[lo:lo + chunk]])
        caps = rows[lo:lo + chunk]
        k = len(caps[0])
        itok, imask = itm.inputs_of(mm.encode_fields("image", imgs, tokens=True), "image")
        text = txt_data.prepare([c for row in caps for c in row], train=False)
        ttok, tmask = itm.inputs_of(mm.encode_fields("text", text, tokens=True), "text")
        image = (itok.repeat_interleave(k, 0), imask.repeat_interleave(k, 0))
        out.append(itm.match_logit({"image": image, "text": (ttok, tmask)}).view(len(caps), k))
    return torch.cat(out).numpy()


def itm_metrics(s: np.ndarray) -> dict[str, float]:
    """Pairwise / top-1 against one-attribute changes, and thresholded accuracy per pair kind."""
    hard = s[:, 1:1 + len(ATTRS)]
    out = {"pairwise_hard": float((s[:, :1] > hard).mean()),
           "top1_hard": float((s[:, :1 + len(ATTRS)].argmax(1) == 0).mean()),
           "acc_pos": float((s[:, 0] > 0).mean()), "acc_hard_neg": float((hard < 0).mean()),
           "acc_random_neg": float((s[:, -1] < 0).mean())}
    out["balanced"] = (out["acc_pos"] + out["acc_hard_neg"]) / 2
    out.update({f"pairwise_{a}": float((s[:, 0] > hard[:, i]).mean()) for i, a in enumerate(ATTRS)})
    return out


def retrieval(model, transforms, data: Path, k: int) -> dict[str, float]:
    """Held-out R@1/5/10 both ways: contrastive, re-ranked by the itm log-odds alone (ALBEF) and by the log-odds
    plus the similarity times the run's own learnt clip logit scale (BLIP-style fused score, ``_fused``)."""
    scale = float(model.objectives["clip"].logit_scale.exp().max())
    tasks = [{"name": "retrieval", "id": name, "data": str(data / "eval"), "rerank": "itm", "rerank_k": k,
              "rerank_similarity": sim} for name, sim in (("itm", 0.0), ("fused", scale))]
    res = run_tasks(model, transforms, tasks, device="cpu", progress=False)
    keys = [f"{d}_r{r}{s}" for s in ("", "_rerank") for d in ("i2t", "t2i") for r in (1, 5, 10)]
    out = {key: res["itm"][key] for key in keys} | {"i2t_r1_chance": res["itm"]["i2t_r1_chance"]}
    out.update({f"{d}_r{r}_fused": res["fused"][f"{d}_r{r}_rerank"] for d in ("i2t", "t2i") for r in (1, 5, 10)})
    return out | {"fused_similarity_weight": scale}


def plot(results: dict[str, dict[str, float]], out: Path) -> Path:
    """Left: R@1 without / with re-ranking per model. Right: held-out ITM accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    r_keys = ["i2t_r1", "i2t_r1_rerank", "i2t_r1_fused", "t2i_r1", "t2i_r1_rerank", "t2i_r1_fused"]
    a_keys = ["pairwise_hard", "top1_hard", "balanced", "acc_random_neg"]
    for ax, keys, title in ((left, r_keys, "held-out retrieval R@1: contrastive vs itm re-ranked"),
                            (right, a_keys, "held-out ITM accuracy")):
        grouped_bars(ax, keys, {f"{name} negatives": [m[k] for k in keys] for name, m in results.items()})
        ax.set_title(title, fontsize=9)
    right.axhline(0.5, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/itm")
    p.add_argument("--rerank-k", type=int, default=16, help="contrastive candidates per query the itm head re-scores")
    a = p.parse_args()
    from mmpt.commands.export import load

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    images, captions = fine_grained_set(data / "eval")
    results, runs = {}, {}
    for name, sets in VARIANTS.items():
        run_dir = work / name
        runs[name] = train_recipe(RECIPE, run_dir, data, a.steps, sets, a.threads)
        model, transforms, _ = load(run_dir)
        results[name] = retrieval(model, transforms, data, a.rerank_k)
        results[name].update(itm_metrics(itm_scores(model, transforms, images, captions)))
        print(f"{name}: trained in {runs[name]['wall_s']:.0f} s; {results[name]}", flush=True)
    print(f"\n{RECIPE}, {a.steps} steps each, {len(images)} held-out images; R@1 chance "
          f"{results['hard']['i2t_r1_chance']:.4f}; pairwise chance 0.500, top1_hard chance {1 / 6:.3f}")
    cols = ["i2t_r1", "i2t_r1_rerank", "i2t_r1_fused", "t2i_r1", "t2i_r1_rerank", "t2i_r1_fused", "pairwise_hard",
            "top1_hard", "acc_pos", "acc_hard_neg", "acc_random_neg", "balanced"]
    print_table(["negatives", *cols], [[n, *[r[c] for c in cols]] for n, r in results.items()])
    h, r = results["hard"], results["random"]
    print(f"\nre-ranking (hard): i2t R@1 {h['i2t_r1']:.3f} -> itm {h['i2t_r1_rerank']:.3f} / fused "
          f"{h['i2t_r1_fused']:.3f}, t2i R@1 {h['t2i_r1']:.3f} -> itm {h['t2i_r1_rerank']:.3f} / fused "
          f"{h['t2i_r1_fused']:.3f}")
    print(f"hard vs random negatives: pairwise vs one-attribute changes {h['pairwise_hard']:.3f} vs "
          f"{r['pairwise_hard']:.3f}; balanced accuracy {h['balanced']:.3f} vs {r['balanced']:.3f}")
    png = plot(results, RESULTS / f"{NAME}.png")
    out = write_json(NAME, {"settings": {"steps": a.steps, "recipe": RECIPE, "variants": VARIANTS,
                                         "rerank_k": a.rerank_k, "threads": a.threads, "n_images": len(images)},
                            "results": results, "runs": runs})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
