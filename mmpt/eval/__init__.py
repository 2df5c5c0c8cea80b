"""Eval tasks (zero-shot, retrieval, linear and per-token probes) of any modality, run from a recipe's ``eval:`` list.

Each entry is ``{name: <registered task>, id: <result name>, ...task keys}``; the keys are the task
class's fields, so a typo fails with the closest valid key before anything runs. Every rank of a
multi-rank job calls :func:`run_tasks` with the same inputs and runs the same forwards (ZeRO-3
forwards are collectives); each embeds its part of the data and the parts are gathered
(:mod:`mmpt.eval.sharding`), so every rank computes the same metrics.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpt.eval.task_list import (
    read_tasks,
    recipe_tasks,
    refuse_untrusted_sources,
    select_tasks,
    stored_tasks,
    task_id,
    tasks_to_run,
)

if TYPE_CHECKING:
    from mmpt.eval.common import Embedded, Task, embed_data, embed_texts
    from mmpt.eval.run import build_tasks, run_tasks

__all__ = ["Embedded", "Task", "build_tasks", "embed_data", "embed_texts", "format_table", "read_tasks", "recipe_tasks",
           "refuse_untrusted_sources", "run_tasks", "select_tasks", "stored_tasks", "task_id", "tasks_to_run", "write_results"]

# Imported on first use: reading and selecting tasks (``mmpt eval`` checking its arguments) needs no torch.
_LAZY = {"Embedded": "mmpt.eval.common", "Task": "mmpt.eval.common", "embed_data": "mmpt.eval.common",
         "embed_texts": "mmpt.eval.common", "build_tasks": "mmpt.eval.run", "run_tasks": "mmpt.eval.run"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mmpt.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


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
