"""``mmpt soup``: model soups (Wortsman et al. 2022) of fine-tunes that share an initialisation.

A *uniform* soup averages the ingredients' state dicts. A *greedy* soup sorts the ingredients by a held-out
metric (``--tasks-file``, ``--metric``), starts from the best one and adds each next ingredient only when the
soup with it scores at least as well as without it (the paper's ``>=``), evaluating the averaged weights.

Averaging is only meaningful for models fine-tuned from one set of weights, so the ingredients must have
the same architecture (every tensor name and shape, then the ``model`` and ``objectives`` config sections)
and the same initialisation. A fine-tune started with ``model.init_from`` records the
:func:`~mmpt.parts.init_from.weights_digest` of that export in its own export (``init_digest``); when every
ingredient carries one they must be equal (an ingredient may also *be* that init). Otherwise the check
falls back to weight space: fine-tunes of one init stay close to it, so their large tensors point the same
way, while independent random inits are nearly orthogonal; the median cosine similarity, over the tensors
of at least ``MIN_NUMEL`` elements, of every ingredient to the first must reach ``MIN_COSINE``. Every
refusal names the tensor that differs most. Integer tensors (BatchNorm's step counters) are taken from the
first ingredient. The output is a normal mmpt export whose header records the ingredients (``soup``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpt.registry import ConfigError

if TYPE_CHECKING:
    import torch

MIN_NUMEL = 1024  # smaller tensors (biases, norms) start from constants: alike whatever the init
MIN_COSINE = 0.5  # fine-tunes of one init: ~0.9-1.0; independent random inits: ~0
SOUP_META = "soup"


@dataclass
class Ingredient:
    """One export: its path, header, raw embedded config and tensors."""

    path: str
    meta: dict[str, str]
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return Path(self.path).name


def read_ingredient(path: str | Path) -> Ingredient:
    """An export's header, raw config and tensors (not unpickled; the config is read as data)."""
    from safetensors.torch import load_file

    from mmpt.commands.export import data_yaml
    from mmpt.formats.export_file import FORMAT, read_header

    meta, _ = read_header(path)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an mmpt export (metadata format {meta.get('format')!r}, expected {FORMAT})")
    raw = data_yaml(meta.get("config", ""), f"{path}: embedded config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: embedded config is not a mapping")
    return Ingredient(str(path), meta, raw, load_file(str(path)))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: tree}


def check_architecture(ings: Sequence[Ingredient]) -> None:
    """Refuse ingredients whose tensors (names, shapes, dtypes) or model/objectives configs differ from the first's."""
    first = ings[0]
    for ing in ings[1:]:
        for key in sorted(set(first.state) | set(ing.state)):
            if key not in ing.state or key not in first.state:
                holder, other = (first, ing) if key in first.state else (ing, first)
                raise ConfigError(f"{ing.path}: another architecture than {first.path}: tensor {key} is in "
                                  f"{holder.name} only, not in {other.name}")
            a, b = first.state[key], ing.state[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ConfigError(f"{ing.path}: another architecture than {first.path}: tensor {key} is "
                                  f"{list(b.shape)} {b.dtype}, expected {list(a.shape)} {a.dtype}")
        for section in ("model", "objectives"):
            fa, fb = _flat(first.config.get(section)), _flat(ing.config.get(section))
            diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
            if diff:
                key = f"{section}.{diff[0]}" if diff[0] else section
                raise ConfigError(f"{ing.path}: another architecture than {first.path}: config {key} is "
                                  f"{fb.get(diff[0])!r}, expected {fa.get(diff[0])!r} (same tensor shapes, "
                                  "another model)")


def cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine similarity of each floating tensor of at least MIN_NUMEL elements in ``a`` and ``b``."""
    import torch

    out = {}
    for key, x in a.items():
        if x.is_floating_point() and x.numel() >= MIN_NUMEL:
            out[key] = float(torch.nn.functional.cosine_similarity(x.double().flatten(), b[key].double().flatten(),
                                                                     dim=0, eps=1e-12))
    return out


def _least_alike(first: Ingredient, ing: Ingredient) -> tuple[str, float, float]:
    """(tensor with the lowest cosine, its cosine, the median cosine) of ``ing`` against ``first``."""
    import statistics

    sims = cosines(first.state, ing.state)
    if not sims:
        return "", 1.0, 1.0
    worst = min(sims, key=sims.__getitem__)
    return worst, sims[worst], statistics.median(sims.values())


def check_init(ings: Sequence[Ingredient]) -> str:
    """Refuse ingredients that do not share an initialisation; returns how it was checked (for the header)."""
    from mmpt.parts.init_from import INIT_META, weights_digest

    recorded = {ing.meta.get(INIT_META) for ing in ings if ing.meta.get(INIT_META)}
    first = ings[0]
    if len(recorded) > 1:
        by = [i for i in ings if i.meta.get(INIT_META)]
        other = next(i for i in by if i.meta[INIT_META] != by[0].meta[INIT_META])
        worst, cos, _ = _least_alike(by[0], other)
        raise ConfigError(f"{other.path}: another initialisation than {by[0].path}: fine-tuned from "
                          f"{other.meta[INIT_META][:12]}, not {by[0].meta[INIT_META][:12]} (init_digest); tensor "
                          f"{worst} differs most (cosine {cos:.3f})")
    if len(recorded) == 1:
        init = recorded.pop()
        if all(i.meta.get(INIT_META) or weights_digest(i.state) == init for i in ings):
            return f"recorded init {init}"
    for ing in ings[1:]:
        worst, cos, median = _least_alike(first, ing)
        if median < MIN_COSINE:
            raise ConfigError(f"{ing.path}: another initialisation than {first.path} (no common init_digest; "
                              f"median cosine of their weights {median:.3f} < {MIN_COSINE}); tensor {worst} differs "
                              f"most (cosine {cos:.3f})")
    return f"weight space (median cosine >= {MIN_COSINE} over tensors of >= {MIN_NUMEL} elements)"


def average(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: the mean of each floating tensor (in float64, stored in its dtype); other tensors
    from the first state."""
    import torch

    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = (torch.stack([s[key].double() for s in states]).mean(0)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def greedy(states: Sequence[dict[str, torch.Tensor]], evaluate: Callable[[dict[str, torch.Tensor]], float]
           ) -> tuple[list[int], list[float], float]:
    """Wortsman et al.'s greedy soup: (chosen indices, each ingredient's own score, the soup's score)."""
    scores = [evaluate(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        score = evaluate(average([states[j] for j in [*chosen, i]]))
        if score >= best:
            chosen, best = [*chosen, i], score
    return chosen, scores, best


def task_metric(tasks_file: str | Path, metric: str | None) -> tuple[list[dict[str, Any]], Callable[[dict], float], str]:
    """The tasks of ``tasks_file`` and a function of their results: ``TASK.METRIC`` (split at the last dot), or
    by default the mean of every task's ``top1``."""
    from mmpt.eval.task_list import read_tasks, tasks_to_run

    where = f"--tasks-file {tasks_file}"
    tasks = tasks_to_run(read_tasks(tasks_file, where), [], [], where, trusted=True)
    if metric:
        task, _, name = metric.rpartition(".")
        if not task or not name:
            raise ConfigError(f"--metric {metric!r}: expected TASK.METRIC, e.g. zero_shot/color.top1")

        def pick(results: dict) -> float:
            if task not in results or not isinstance(results[task].get(name), (int, float)):
                known = [f"{t}.{m}" for t, r in results.items() for m, v in r.items() if isinstance(v, (int, float))]
                raise ConfigError(f"--metric {metric}: no such result; results: {', '.join(known[:12])}")
            return float(results[task][name])
        return tasks, pick, metric

    def mean_top1(results: dict) -> float:
        values = [float(r["top1"]) for r in results.values() if isinstance(r.get("top1"), (int, float))]
        if not values:
            raise ConfigError(f"{where}: no task reports top1; name the held-out metric with --metric TASK.METRIC")
        return sum(values) / len(values)
    return tasks, mean_top1, "mean top1"


@dataclass
class SoupResult:
    """What :func:`soup` wrote: the file, the ingredients in it, each one's score and the soup's (greedy)."""

    out: Path
    method: str
    ingredients: list[str]
    chosen: list[str]
    scores: dict[str, float] | None
    soup_score: float | None
    init_check: str

    def __str__(self) -> str:
        lines = [f"{self.method} soup of {len(self.chosen)} of {len(self.ingredients)} exports -> {self.out} "
                 f"(init: {self.init_check})"]
        for path in self.ingredients:
            score = f"  {self.scores[path]:.4f}" if self.scores else ""
            lines.append(f"  {'+' if path in self.chosen else '-'} {path}{score}")
        if self.soup_score is not None:
            lines.append(f"  soup{' ' * max(1, len(max(self.ingredients, key=len)) - 2)}{self.soup_score:.4f}")
        return "\n".join(lines)


def soup(paths: Sequence[str | Path], out: str | Path, *, greedy_by: str | Path | None = None,
         metric: str | None = None) -> SoupResult:
    """Write the uniform soup of the exports ``paths`` to ``out``, or, with ``greedy_by`` (a tasks file), the
    greedy soup by ``metric`` on those tasks."""
    from mmpt.commands.export import export_config, write_export
    from mmpt.parts.init_from import INIT_META, weights_digest

    if len(paths) < 2:
        raise ConfigError(f"a soup needs at least 2 exports, got {len(paths)}")
    if Path(out).resolve() in {Path(p).resolve() for p in paths}:
        raise ConfigError(f"--out {out}: is one of the ingredients; write the soup to a new file")
    tasks = pick = None
    if greedy_by is not None:
        tasks, pick, metric = task_metric(greedy_by, metric)
    ings = [read_ingredient(p) for p in paths]
    check_architecture(ings)
    init_check = check_init(ings)
    cfg = export_config(ings[0].path, ings[0].meta)
    states = [i.state for i in ings]
    scores = soup_score = None
    if tasks is not None:
        from mmpt.commands.export import load
        from mmpt.eval import run_tasks

        model, transforms, _ = load(ings[0].path)

        def evaluate(state: dict[str, torch.Tensor]) -> float:
            model.load_state_dict(state)
            return pick(run_tasks(model, transforms, tasks, device="cpu", progress=False))

        chosen, own, soup_score = greedy(states, evaluate)
        scores = {i.path: s for i, s in zip(ings, own, strict=True)}
    else:
        chosen = list(range(len(ings)))
    state = average([states[i] for i in chosen])
    record = {"method": "greedy" if tasks is not None else "uniform", "init_check": init_check,
              "metric": metric, "soup_metric": soup_score,
              "ingredients": [{"file": i.path, "weights_digest": weights_digest(i.state), "in_soup": n in chosen,
                               **({"metric": scores[i.path]} if scores else {})} for n, i in enumerate(ings)]}
    extra = {SOUP_META: json.dumps(record)}
    if init_check.startswith("recorded init "):
        extra[INIT_META] = init_check.removeprefix("recorded init ")
    written = write_export(state, cfg, out, source=f"soup of {len(chosen)} exports", step=0, extra=extra)
    return SoupResult(written, record["method"], [i.path for i in ings], [ings[n].path for n in chosen], scores,
                      soup_score, init_check)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt soup EXPORT... --out FILE [--greedy --tasks-file F [--metric NAME]]``."""
    s = sub.add_parser("soup", help="average fine-tunes of one init into one model (uniform or greedy soup)",
                       description=__doc__.split("\n\n")[1])
    s.add_argument("exports", nargs="+", metavar="EXPORT", help="exported .safetensors files fine-tuned from one init")
    s.add_argument("--out", required=True, help="output .safetensors path (a normal mmpt export)")
    s.add_argument("--greedy", action="store_true", help="greedy soup: add an ingredient only when the held-out "
                   "metric of the soup does not drop (needs --tasks-file)")
    s.add_argument("--tasks-file", help="YAML list of eval tasks on held-out data (greedy)")
    s.add_argument("--metric", help="TASK.METRIC to maximise, e.g. zero_shot/color.top1 (default: mean top1)")
    s.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.greedy and not args.tasks_file:
        raise ConfigError("--greedy: give --tasks-file F, the held-out eval tasks that rank the ingredients")
    if not args.greedy and (args.tasks_file or args.metric):
        raise ConfigError("--tasks-file/--metric: only a greedy soup evaluates; add --greedy")
    print(soup(args.exports, args.out, greedy_by=args.tasks_file if args.greedy else None, metric=args.metric))
    return 0
