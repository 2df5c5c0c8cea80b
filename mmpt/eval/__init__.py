"""Eval tasks (zero-shot, retrieval, linear and per-token probes) of any modality, run from a recipe's ``eval:`` list.

Each entry is ``{name: <registered task>, id: <result name>, ...task keys}``; the keys are the task
class's fields, so a typo fails with the closest valid key before anything runs. Every rank of a
multi-rank job calls :func:`run_tasks` with the same inputs and runs the same forwards (ZeRO-3
forwards are collectives); each embeds its part of the data and the parts are gathered
(:mod:`mmpt.eval.sharding`), so every rank computes the same metrics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmpt.contracts import ModalityData
from mmpt.eval.common import Embedded, Task, embed_data, embed_texts
from mmpt.eval.sharding import split_over_ranks
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, closest
from mmpt.registry import tasks as task_registry

__all__ = ["Embedded", "Task", "build_tasks", "embed_data", "embed_texts", "format_table", "refuse_untrusted_sources",
           "run_tasks", "select_tasks", "task_id", "write_results"]


def build_tasks(entries: Sequence[dict[str, Any]]) -> list[tuple[str, Task]]:
    """Validate and build every task of a recipe's ``eval:`` list; returns (result name, task) pairs."""
    built: list[tuple[str, Task]] = []
    where: dict[str, str] = {}
    for i, entry in enumerate(entries):
        path = f"eval[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{path}: expected a mapping with 'name' (one of: {', '.join(task_registry.names())})")
        kwargs = {k: v for k, v in entry.items() if k not in ("name", "id")}
        try:
            task = task_registry.build(entry["name"], path=path, **kwargs)
        except ConfigError as exc:
            raise _at(path, exc) from exc
        name = str(entry.get("id") or task.default_id())
        if name in where:
            raise ConfigError(f"{path}: result name '{name}' is also {where[name]}'s; give one of them an 'id'")
        where[name] = path
        built.append((name, task))
    return built


def task_id(entry: dict[str, Any]) -> str:
    """The result name of a task entry without validating it (selection comes before validation)."""
    import dataclasses

    if entry.get("id"):
        return str(entry["id"])
    try:
        cls = task_registry.get(str(entry.get("name")))
        task = object.__new__(cls)  # fields only, no __post_init__ checks: they may need files elsewhere
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(task, f.name, entry.get(f.name, None if default is dataclasses.MISSING else default))
        return task.default_id()
    except Exception:  # an entry too broken to name; building it reports the problem if it is selected
        return str(entry.get("name"))


def select_tasks(entries: Sequence[Any], wanted: Sequence[str], where: str = "eval") -> list[dict[str, Any]]:
    """Entries whose id or name is in ``wanted`` (all when empty); an unknown id is a ConfigError."""
    if not wanted:
        return list(entries)
    entries = [e for e in entries if isinstance(e, dict)]
    ids = [task_id(e) for e in entries]
    unknown = [w for w in wanted if w not in ids and not any(e.get("name") == w for e in entries)]
    if unknown:
        raise ConfigError(f"--task {unknown[0]}: no such task in {where}{closest(unknown[0], ids)}; "
                          f"tasks: {', '.join(ids) or 'none'}")
    return [e for e, i in zip(entries, ids, strict=True) if i in wanted or e.get("name") in wanted]


def refuse_untrusted_sources(entries: Sequence[dict[str, Any]], where: str) -> None:
    """Refuse task values that run a command or reach the network (``pipe:``, ``scheme://``): tasks read
    from an export or a run directory are data, and data never starts a process."""
    def walk(value: Any, path: str) -> None:
        if isinstance(value, str) and (value.strip().startswith("pipe:") or "://" in value):
            raise ConfigError(f"{where}: {path}: {value[:60]!r} is a command or network source; tasks stored in "
                              "a model file may only read local files (give your own --tasks-file to use it)")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    for i, entry in enumerate(entries):
        walk(entry, f"eval[{i}]")


def _at(path: str, exc: ConfigError) -> ConfigError:
    # Tasks name the key in their own checks ("label_key: ..."); the registry already names the path.
    return exc if str(exc).startswith(path) else ConfigError(f"{path}.{exc}")


def _task_model(task: Task, model: Any, where: str) -> Any:
    """The towers (``MultimodalModel``) for most tasks; the whole Pretrainer for a task that generates with
    an objective (``uses_objectives``, e.g. ``caption``), which run_tasks must then have been given."""
    towers = getattr(model, "model", model)
    if not getattr(task, "uses_objectives", False):
        return towers
    if towers is model:
        raise ConfigError(f"{where}: task '{getattr(task, 'registry_name', type(task).__name__)}' generates with "
                          "the model's objectives, but only its towers were passed to run_tasks")
    return model


def run_tasks(model: MultimodalModel, specs: dict[str, ModalityData], tasks: Sequence[dict[str, Any]],
              device: torch.device | str, progress: bool = True, *, rank: int = 0,
              world: int = 1) -> dict[str, dict[str, Any]]:
    """Run every eval task in eval mode without gradients; returns {result name: metrics}. With ``world``
    > 1 every rank of the process group calls this, embeds its part and gets the same results."""
    built = build_tasks(tasks)  # every config error surfaces before any task spends time
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad(), split_over_ranks(rank, world):
            for i, (name, task) in enumerate(built):
                try:
                    results[name] = task.run(_task_model(task, model, f"eval[{i}]"), specs, device, progress)
                except ConfigError as exc:  # found only once the data is read (e.g. a label_key in no json)
                    raise _at(f"eval[{i}]", exc) from exc
    finally:
        model.train(was_training)
    return results


def _chance(metrics: dict[str, Any], metric: str) -> float | None:
    # ``<metric>_chance`` belongs to that metric; a bare ``chance`` (one over the number of classes) to
    # every top-1 accuracy.
    top1 = metric == "top1" or metric.endswith("_top1")
    value = metrics.get(f"{metric}_chance", metrics.get("chance") if top1 else None)
    return value if isinstance(value, (int, float)) else None


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Fixed-width text table: task, metric, value and chance level where known (tables are left out)."""
    rows = [("task", "metric", "value", "chance")]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            is_chance = metric == "chance" or (metric.endswith("_chance") and not metric.endswith("_over_chance"))
            if is_chance or not isinstance(value, (int, float)):
                continue
            rows.append((task, metric, _fmt(value), _fmt(_chance(metrics, metric))))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_results(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Write results as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
