"""Build and run a list of eval tasks (in eval mode, without gradients, split over the ranks of a job)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmpt.contracts import ModalityData
from mmpt.eval.common import Task, nested_size
from mmpt.eval.sharding import split_over_ranks
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError
from mmpt.registry import tasks as task_registry


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
                    with nested_size(task.dim, task.layer):
                        results[name] = task.run(_task_model(task, model, f"eval[{i}]"), specs, device, progress)
                except ConfigError as exc:  # found only once the data is read (e.g. a label_key in no json)
                    raise _at(f"eval[{i}]", exc) from exc
    finally:
        model.train(was_training)
    return results
