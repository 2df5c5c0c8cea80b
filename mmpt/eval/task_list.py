"""Eval task lists before anything runs: read from a file, selected by id, overridden, checked for trust.

Nothing here imports torch: ``mmpt eval`` refuses a mistyped task file in one line before the model load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mmpt.config import apply_overrides, expand_env, load_yaml
from mmpt.formats.export_file import read_header
from mmpt.registry import ConfigError, closest
from mmpt.registry import tasks as task_registry


def read_tasks(path: str | Path, where: str | None = None) -> list[Any]:
    """The task list of a YAML file (a list, or a recipe's ``eval:``); errors start with ``where`` (the path)."""
    where = str(path) if where is None else where
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    try:
        tasks = yaml.safe_load(expand_env(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
    tasks = tasks.get("eval", []) if isinstance(tasks, dict) else tasks
    if not isinstance(tasks, list):
        raise ConfigError(f"{where}: expected a list of tasks or a mapping with 'eval'")
    return tasks


def stored_tasks(model: str | Path, where: str) -> list[Any]:
    """The ``eval:`` list a run directory (its config.yaml) or an export (its header) was trained with."""
    if Path(model).is_dir():
        return recipe_tasks(load_yaml(Path(model) / "config.yaml"), where)
    return recipe_tasks(yaml.safe_load(read_header(model)[0]["config"]), where)


def recipe_tasks(recipe: dict[str, Any], where: str) -> list[Any]:
    """The ``eval:`` list of a recipe dict."""
    tasks = recipe.get("eval", [])
    if not isinstance(tasks, list):
        raise ConfigError(f"{where}: eval: expected a list of tasks, got {type(tasks).__name__}")
    return tasks


def tasks_to_run(entries: Sequence[Any], wanted: Sequence[str], overrides: Sequence[str], where: str, *,
                 trusted: bool) -> list[dict[str, Any]]:
    """The selected entries (all when ``wanted`` is empty) with ``key=value`` overrides set; sources that run a
    command or reach the network are refused unless ``trusted``; an empty result is a ConfigError."""
    # Select first, then override and validate only what runs: unselected tasks may name paths that
    # exist only where the model was trained.
    tasks = [apply_overrides(dict(t), list(overrides)) for t in select_tasks(entries, wanted, where)]
    if not trusted:
        refuse_untrusted_sources(tasks, where)
    if not tasks:
        raise ConfigError(f"{where}: no eval tasks to run")
    return tasks


def task_id(entry: dict[str, Any]) -> str:
    """The result name of a task entry without validating it (selection comes before validation)."""
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
