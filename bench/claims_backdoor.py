"""Claim (the seed paper, "Effective Backdoor Mitigation in Vision-Language Models Depends on the Pre-training
Objective"): CleanCLIP removes a patch backdoor from a model pre-trained with ``clip`` alone, and much less
from one pre-trained with a stronger objective mix; zero-shot accuracy is reported before and after.

One command: ``mmpt data poison`` puts a noise-patch trigger on ``--fraction`` of the demo training images and
captions them with the target class ("a star"); ``clip-tiny``'s towers are pre-trained on that data with
``clip`` alone and with ``clip`` + a stronger term (``--strong siglip``: + ``siglip``; ``ssl``: + CleanCLIP's own
in-modality self-supervision, the paper's MMCL + SSL), each exported, then fine-tuned with ``cleanclip-tiny``
on the clean demo data. Every model is scored on the held-out split: zero-shot shape top-1 and the backdoor's
attack success rate (triggered non-star images classified as star; the same share without the trigger is
the floor). Prints a table, draws ``bench/results/claims_backdoor.png`` and writes the JSON next to it.

    .venv/bin/python bench/claims_backdoor.py                       # 300 pre-training + 100 CleanCLIP steps, seed 0
    .venv/bin/python bench/claims_backdoor.py --seeds 0 1 --fraction 0.03 --strong ssl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_common import add_run_args, ensure_demo_data, grouped_bars, print_table, train_recipe, write_json  # noqa: E402
from common import RESULTS  # noqa: E402

NAME = "claims_backdoor"
# The stronger pre-training terms beside clip-tiny's clip objective.
STRONG = {
    # siglip-tiny's objective and its bias lr multiplier
    "siglip": ["objectives.siglip={name: siglip, pairs: [[image, text]], exchange: bidir}",
               "optim.lr_scale={objectives.siglip.logit_bias: 100.0}"],
    # clip -> cleanclip: the same clip term plus the in-modality terms on second views (CleanCLIP's loss used in
    # pre-training, the seed paper's MMCL + SSL); the objective keeps the name clip
    "ssl": ["objectives.clip={name: cleanclip, pairs: [[image, text]], gather: no_grad}",
            "model.encoders.image.train_views=2", "model.encoders.text.train_views=2"],
}


def poison(data: Path, out: Path, fraction: float, caption: str, patch: int) -> dict:
    """A demo-data folder at ``out`` whose train split is the poisoned copy (eval, classes, templates linked)."""
    from mmpt.data.poison import Trigger, poison_shards

    record = out / "poisoned.json"
    if not record.exists():
        summary = poison_shards(str(data / "train" / "*.tar"), str(out / "train" / "poisoned-%06d.tar"),
                                fraction=fraction, target=caption, trigger=Trigger(patch, "noise", "fixed", 0),
                                max_count=2000, record=record)
        print(summary, flush=True)
    for name in ("eval", "classes", "templates", "info.json"):
        link = out / name
        if not link.exists():
            link.symlink_to((data / name).resolve())
    rec = json.loads(record.read_text())
    return {"poisoned": len(rec["poisoned"]), "total": rec["total"], "caption": caption}


def evaluate(path: Path, data: Path, target: str, patch: int) -> dict:
    """Held-out zero-shot shape top-1 and the backdoor's ASR (and its clean floor) of an export or run."""
    from mmpt.commands.export import load
    from mmpt.eval import run_tasks

    model, transforms, _ = load(path)
    task = {"name": "backdoor", "data": str(data / "eval"), "label_key": "shape",
            "classnames": str(data / "classes" / "shape.txt"), "templates": str(data / "templates" / "shape.txt"),
            "target": target, "patch_size": patch, "trigger_seed": 0}
    res = run_tasks(model.model, transforms, [task], device="cpu", progress=False)[f"backdoor/{target}"]
    return {"top1": res["clean_top1"], "asr": res["asr"], "clean_target_rate": res["clean_target_rate"],
            "triggered_top1": res["triggered_top1"], "chance_top1": 1 / len(
                (data / "classes" / "shape.txt").read_text().split())}


def trained(reuse: bool, recipe: str, run_dir: Path, data: Path, steps: int, sets: list[str], threads: int) -> dict:
    """:func:`train_recipe`'s result, or with ``reuse`` the one recorded by an earlier invocation's finished run
    in the same folder (``--reuse``: add seeds without retraining the others)."""
    record = run_dir.parent / f"{run_dir.name}.run.json"
    if reuse and record.exists() and (run_dir / "metrics.jsonl").exists():
        return json.loads(record.read_text())
    result = train_recipe(recipe, run_dir, data, steps, sets, threads)
    record.write_text(json.dumps(result))
    return result


def plot(rows: list[dict], out: Path) -> Path:
    """ASR and top-1 before/after CleanCLIP per pre-training objective (mean over seeds; points per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["pretrain"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("asr", "top1"), strict=True):
        series = {stage: [statistics.mean(r[metric] for r in rows if r["pretrain"] == a and r["stage"] == stage)
                          for a in arms] for stage in ("pre-trained", "after CleanCLIP")}
        grouped_bars(ax, arms, series)
        width = 0.8 / len(series)
        for j, stage in enumerate(series):
            for i, a in enumerate(arms):
                vals = [r[metric] for r in rows if r["pretrain"] == a and r["stage"] == stage]
                ax.scatter([i + j * width] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_title({"asr": "attack success rate (held-out)", "top1": "zero-shot shape top-1 (held-out)"}[metric],
                     fontsize=9)
    fig.suptitle(f"backdoor ({rows[0]['fraction']:.0%} poisoned, {rows[0].get('patch_size', '?')}-px trigger, "
                 f"{rows[0]['steps']} steps) then CleanCLIP "
                 f"({rows[0]['clean_steps']} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=300, work="runs/claims/backdoor")
    p.add_argument("--clean-steps", type=int, default=100, help="CleanCLIP fine-tuning steps (cleanclip-tiny)")
    p.add_argument("--fraction", type=float, default=0.05, help="share of training samples poisoned")
    p.add_argument("--target", default="star", help="the attacked shape class")
    p.add_argument("--patch-size", type=int, default=8, help="trigger side in pixels of the 64-px demo images")
    p.add_argument("--strong", default="siglip", choices=sorted(STRONG), help="the stronger pre-training term")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tag", default="", help="suffix of the result files (claims_backdoor<TAG>.json/.png)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs and scores of an earlier invocation "
                   "(same settings): add seeds without redoing the others")
    a = p.parse_args()
    from mmpt.commands.export import export

    data, work = Path(a.data), Path(a.work)
    ensure_demo_data(data, a.threads)
    template = (data / "templates" / "shape.txt").read_text().splitlines()[0]
    poisoned = work / f"poisoned-{a.fraction:g}"
    info = poison(data, poisoned, a.fraction, template.replace("{}", a.target), a.patch_size)
    arms = {"clip": [], f"clip+{a.strong}": STRONG[a.strong]}
    rows = []
    for seed in a.seeds:
        for arm, extra in arms.items():
            tag = f"{arm.replace('+', '-')}-s{seed}"
            run = trained(a.reuse, "clip-tiny", work / tag, poisoned, a.steps, [*extra, f"seed={seed}"], a.threads)
            init = work / f"{tag}.safetensors"
            if not (a.reuse and init.exists()):
                export(work / tag, init)
            cleaned = work / f"{tag}-cleanclip{a.clean_steps}"
            clean = trained(a.reuse, "cleanclip-tiny", cleaned, data, a.clean_steps,
                            [f"model.init_from={init.resolve()}", f"seed={seed}"], a.threads)
            for stage, path, wall in (("pre-trained", init, run["wall_s"]), ("after CleanCLIP", cleaned, clean["wall_s"])):
                cache = path.parent / f"{path.name}.eval.json"
                if a.reuse and cache.exists():
                    scores = json.loads(cache.read_text())
                else:
                    scores = evaluate(path, data, a.target, a.patch_size)
                    cache.write_text(json.dumps(scores))
                row = {"pretrain": arm, "seed": seed, "stage": stage, "steps": a.steps, "clean_steps": a.clean_steps,
                       "fraction": a.fraction, "patch_size": a.patch_size, **scores, "wall_s": wall}
                print(f"{arm:12s} seed {seed} {stage:15s}: top1 {row['top1']:.3f}  ASR {row['asr']:.3f} "
                      f"(clean floor {row['clean_target_rate']:.3f})  train {wall:.0f} s", flush=True)
                rows.append(row)
    print()
    summary: dict[str, dict] = {}
    for arm in arms:
        summary[arm] = {}
        for stage in ("pre-trained", "after CleanCLIP"):
            mine = [r for r in rows if r["pretrain"] == arm and r["stage"] == stage]
            summary[arm][stage] = {m: {"mean": statistics.mean(r[m] for r in mine),
                                       "spread": max(r[m] for r in mine) - min(r[m] for r in mine)}
                                   for m in ("top1", "asr", "clean_target_rate")}

    def cell(arm: str, stage: str, m: str) -> str:
        s = summary[arm][stage][m]
        return f"{s['mean']:.3f}" + (f" ±{s['spread'] / 2:.3f}" if len(a.seeds) > 1 else "")

    print_table(["pre-training", "top1 before", "top1 after", "ASR before", "ASR after", "ASR floor after"],
                [[arm, cell(arm, "pre-trained", "top1"), cell(arm, "after CleanCLIP", "top1"),
                  cell(arm, "pre-trained", "asr"), cell(arm, "after CleanCLIP", "asr"),
                  cell(arm, "after CleanCLIP", "clean_target_rate")] for arm in arms])
    weak, strong = list(arms)
    after = {arm: summary[arm]["after CleanCLIP"]["asr"]["mean"] for arm in arms}
    before = {arm: summary[arm]["pre-trained"]["asr"]["mean"] for arm in arms}
    implanted = all(before[arm] > 2 * summary[arm]["pre-trained"]["clean_target_rate"]["mean"] + 0.05 for arm in arms)
    # the paper's direction: CleanCLIP removes the backdoor from the clip-only model (ASR down by 0.1 or more)
    # and leaves clearly more of it (0.05 or more) after the stronger pre-training
    cleaned = after[weak] <= before[weak] - 0.1
    verdict = ("not reproduced: the backdoor was not implanted in both models" if not implanted else
               "not reproduced: CleanCLIP did not remove the backdoor from the clip-only model" if not cleaned else
               "reproduced" if after[strong] >= after[weak] + 0.05 else
               "not reproduced: CleanCLIP left as little of the backdoor after the stronger pre-training")
    print(f"\nASR after CleanCLIP: {weak} {after[weak]:.3f}, {strong} {after[strong]:.3f} (before: "
          f"{before[weak]:.3f}, {before[strong]:.3f}); the paper's direction (higher after the stronger "
          f"objective): {verdict}")
    png = plot(rows, RESULTS / f"{NAME}{a.tag}.png")
    out = write_json(f"{NAME}{a.tag}", {"settings": {"steps": a.steps, "clean_steps": a.clean_steps, "fraction": a.fraction,
                                         "target": a.target, "patch_size": a.patch_size, "strong": STRONG[a.strong],
                                         "seeds": a.seeds, "threads": a.threads},
                            "poison": info, "rows": rows, "summary": summary, "verdict": verdict})
    print(f"plot: {png}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
