"""Eval task lists before anything runs (mmpt.eval.task_list): reading, selecting, overriding, trust."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmpt.eval import read_tasks, recipe_tasks, stored_tasks, tasks_to_run
from mmpt.registry import ConfigError

TASKS = [{"name": "zero_shot", "id": "color", "data": "/eval/a", "label_key": "color"},
         {"name": "retrieval", "data": "pipe:cat /eval/b.tar"}]


def test_read_tasks_takes_a_list_or_a_recipe_and_names_the_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVAL_ROOT", "/data/eval")
    listed = tmp_path / "tasks.yaml"
    listed.write_text("- {name: zero_shot, data: ${EVAL_ROOT}/x}\n")
    assert read_tasks(listed) == [{"name": "zero_shot", "data": "/data/eval/x"}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\neval:\n  - {name: retrieval, data: d}\n")
    assert read_tasks(recipe) == [{"name": "retrieval", "data": "d"}]
    (tmp_path / "none.yaml").write_text("name: r\n")
    assert read_tasks(tmp_path / "none.yaml") == []
    for text, problem in (("just a string\n", "expected a list of tasks or a mapping with 'eval'"),
                          ("- [unclosed\n", "while parsing")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"^--tasks-file bad.yaml: {problem}"):
            read_tasks(tmp_path / "bad.yaml", "--tasks-file bad.yaml")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'missing.yaml'}: No such file"):
        read_tasks(tmp_path / "missing.yaml")


def test_recipe_tasks_refuses_an_eval_that_is_not_a_list() -> None:
    assert recipe_tasks({"eval": TASKS}, "m") == TASKS and recipe_tasks({}, "m") == []
    with pytest.raises(ConfigError, match="^m: eval: expected a list of tasks, got str$"):
        recipe_tasks({"eval": "zero_shot"}, "m")


def test_stored_tasks_of_a_run_directory_and_an_export(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"name": "r", "eval": TASKS}))
    assert stored_tasks(tmp_path / "run", "m") == TASKS
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "m.safetensors"),
              metadata={"config": yaml.safe_dump({"name": "r", "eval": TASKS[:1]})})
    assert stored_tasks(tmp_path / "m.safetensors", "m") == TASKS[:1]


def test_tasks_to_run_selects_then_overrides_and_checks_trust() -> None:
    picked = tasks_to_run(TASKS, ["color"], ["data=/mine", "batch_size=4"], "f", trusted=False)
    assert picked == [{**TASKS[0], "data": "/mine", "batch_size": 4}]
    assert TASKS[0]["data"] == "/eval/a"  # the entries given are left as they were
    assert len(tasks_to_run(TASKS, [], [], "f", trusted=True)) == 2  # the user's own file: pipe: allowed
    with pytest.raises(ConfigError, match=r"^m: eval\[1\]\.data: 'pipe:cat /eval/b.tar' is a command"):
        tasks_to_run(TASKS, [], [], "m", trusted=False)
    with pytest.raises(ConfigError, match="^--task colour: no such task in f"):
        tasks_to_run(TASKS, ["colour"], [], "f", trusted=True)
    with pytest.raises(ConfigError, match="^f: no eval tasks to run$"):
        tasks_to_run([], [], [], "f", trusted=True)


def test_reading_and_selecting_tasks_imports_no_torch(tmp_path: Path) -> None:
    """``mmpt eval`` checks its task list before the model load: mmpt.eval loads its runner on first use."""
    (tmp_path / "tasks.yaml").write_text("- {name: zero_shot, id: color, data: /eval/a}\n")
    code = ("import sys\nfrom mmpt.eval import read_tasks, tasks_to_run\n"
            f"tasks_to_run(read_tasks({str(tmp_path / 'tasks.yaml')!r}), ['color'], [], 'f', trusted=True)\n"
            "print([m for m in ('torch', 'deepspeed', 'timm', 'transformers') if m in sys.modules])\n"
            "from mmpt.eval import run_tasks\nprint(run_tasks.__module__, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "mmpt.eval.run True"]
