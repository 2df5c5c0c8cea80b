"""A model file is data: eval tasks stored in an export never start a process or reach the network, and
only run when asked for; the user's own task file may use pipe:. Task selection comes before overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from exportkit import config_of, train_and_export, with_config
from shardkit import COLORS

from mmpt.cli import main


@pytest.fixture(scope="module")
def exported(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_export(color_shards, tmp_path_factory.mktemp("sec"))


def zero_shot(data: str, **kw: object) -> dict:
    return {"name": "zero_shot", "data": data, "label_key": "color", "classnames": list(COLORS), **kw}


def crafted(exported: Path, tmp_path: Path, tasks: list[dict]) -> Path:
    cfg = config_of(exported)
    cfg["eval"] = tasks
    return with_config(exported, tmp_path / "crafted.safetensors", cfg)


def test_embedded_pipe_task_never_runs(exported: Path, color_shards: list[str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    path = crafted(exported, tmp_path, [zero_shot(f"pipe:touch {marker}; cat {color_shards[0]}", id="evil")])
    assert main(["eval", str(path)]) == 2  # embedded tasks are ignored unless asked for
    assert "--use-embedded-tasks" in capsys.readouterr().err
    assert main(["eval", str(path), "--use-embedded-tasks"]) == 2
    err = capsys.readouterr().err
    assert "eval[0].data" in err and "command or network source" in err and "\n" not in err.strip()
    assert main(["eval", str(path), "--use-embedded-tasks", "--task", "evil"]) == 2
    url = crafted(exported, tmp_path, [zero_shot("https://example.com/shard-{000..001}.tar")])
    assert main(["eval", str(url), "--use-embedded-tasks"]) == 2
    assert "command or network source" in capsys.readouterr().err
    assert not marker.exists()


def test_embedded_local_tasks_run_when_asked(exported: Path, color_shards: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    path = crafted(exported, tmp_path, [zero_shot(color_shards[0], templates=["a {} square"])])
    assert main(["eval", str(path), "--use-embedded-tasks", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["zero_shot/color"]["n"] == 40


def test_users_own_tasks_file_may_use_pipe(exported: Path, color_shards: list[str], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump([zero_shot(f"pipe:cat {color_shards[0]}")]))
    assert main(["eval", str(exported), "--tasks-file", str(tasks), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["zero_shot/color"]["n"] == 40


def test_select_then_override_then_validate(exported: Path, color_shards: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    # Task 0 names a folder that exists only where the model was trained, and has no key
    # `captions_key`; selecting task 1 must neither validate task 0 nor set the key on it.
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump([zero_shot("train_dir/eval-*.tar"),
                                     {"name": "retrieval", "data": color_shards[1]}]))
    out = tmp_path / "r.json"
    assert main(["eval", str(exported), "--tasks-file", str(tasks), "--task", "retrieval",
                 "--set", "captions_key=captions", "--set", "batch_size=16", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["retrieval"]
    assert json.loads(out.read_text())["retrieval"]["n_images"] == 50
    # the same selection from the tasks stored in an export
    path = crafted(exported, tmp_path, yaml.safe_load(tasks.read_text()))
    assert main(["eval", str(path), "--use-embedded-tasks", "--task", "retrieval", "--set", "captions_key=captions",
                 "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["retrieval"]
    capsys.readouterr()
    assert main(["eval", str(path), "--use-embedded-tasks", "--task", "retreival"]) == 2
    err = capsys.readouterr().err
    assert "--task retreival: no such task" in err and "did you mean 'retrieval'" in err
