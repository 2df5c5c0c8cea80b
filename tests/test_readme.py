"""Every command and Python example in README.md runs and exits 0 (fast variants: fewer steps/samples).

Commands run in README order in a fresh copy of the clone (its tracked files and nothing else: every
file a command reads was made by an earlier one), as a user would type them: ``mmpt`` as
``python -m mmpt``, ``torchrun`` as ``python -m torch.distributed.run``, ``python`` as this interpreter.
Fast variants only append settings (``--set train.steps=2``, fewer demo samples); they never drop what
the README says. ``yaml`` blocks are examples a user adapts: their task lists must build, not run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shardkit import fresh_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Appended to each command of that kind (later --set wins over the README's own values).
FAST = {
    "train": ["--set", "train.steps=2", "--set", "data.batch_size=8", "--set", "train.checkpoint_every=1",
              "--set", "data.shuffle_buffer=16", "--set", "train.progress=false", "--set", "train.eval_every=0",
              "--set", "optim.warmup_steps=1"],
    "data demo": ["--train-samples", "96", "--eval-samples", "48"],
    "demo": ["--smoke"],
    "embed": ["--batch-size", "16"],
}


def blocks(kind: str | None = None) -> list[str] | list[tuple[str, str]]:
    """The fenced code blocks of README.md with the info string ``kind``; with no kind, every bash and
    python block as ``(kind, body)`` in README order."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    if kind is None:
        return [(k, body) for k, body in found if k in ("bash", "python")]
    return [body for k, body in found if k == kind]


def command_lines(block: str) -> list[str]:
    """Command lines of one bash block (comments stripped; ``make`` targets are CI's own job)."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "make "))]


def commands() -> list[str]:
    """Command lines of every bash block of the README."""
    return [line for block in blocks("bash") for line in command_lines(block)]


def runnable(line: str) -> list[str]:
    """The argv that runs README ``line`` here, with its fast variant appended."""
    argv = shlex.split(line)
    if argv[0] == "mmpt":
        argv = [sys.executable, "-m", "mmpt", *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[:2] == ["python", "-m"]:
        argv = [sys.executable, *argv[1:]]
    else:
        raise AssertionError(f"README command {line!r}: not an mmpt/torchrun/python -m command")
    if "mmpt" not in argv:
        return argv
    rest = argv[argv.index("mmpt") + 1:]
    for key in ("data demo", "train", "demo", "embed"):
        if " ".join(rest[:len(key.split())]) == key:
            if key == "train" and "--resume" in rest:
                return argv + FAST[key] + ["--set", "train.steps=3"]
            return argv + FAST[key]
    return argv


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone: a copy of the repository's tracked files (as they are in the working tree), no more."""
    root = tmp_path_factory.mktemp("readme") / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        src = ROOT / name
        if name and src.is_file():  # a tracked file deleted in the working tree is not in a clone of it
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    return root


def test_readme_task_lists_name_real_tasks_and_keys() -> None:
    """The task-list example names the user's own folders, so it is checked, not run: every entry is a
    registered task and every key one of that task's."""
    import dataclasses

    from mmpt.registry import tasks

    lists = [yaml.safe_load(body) for body in blocks("yaml") if body.startswith("# my_tasks")]
    assert lists, "README: the 'Evaluate your own data' task list is gone"
    for entry in (e for task_list in lists for e in task_list):
        keys = {f.name for f in dataclasses.fields(tasks.get(entry["name"]))} | {"name", "id"}
        assert set(entry) <= keys, (entry, set(entry) - keys)


def test_readme_lists_the_two_commands_and_ci_calls_one() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_commands_and_python_run(sandbox: Path) -> None:
    # PYTHONSAFEPATH: ``python -m``/``-c`` import the installed mmpt, as the ``mmpt`` script does, not the
    # copy's mmpt/ folder (the same files in CI; while the tree is being edited, untracked ones are not copied)
    env = fresh_env(OMP_NUM_THREADS="1", MMPT_DIST_TIMEOUT="120", PYTHONSAFEPATH="1")
    assert len(commands()) >= 8, commands()
    for kind, block in blocks():  # in README order: a python block may write what a later command reads
        if kind == "bash":
            for line in command_lines(block):
                done = subprocess.run(runnable(line), cwd=sandbox, env=env, capture_output=True, text=True,
                                      timeout=600)
                assert done.returncode == 0, (f"README command failed: {line}\n{done.stdout[-3000:]}\n"
                                              f"{done.stderr[-3000:]}")
            continue
        done = subprocess.run([sys.executable, "-c", block], cwd=sandbox, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"README python block failed:\n{block}\n{done.stderr[-3000:]}"


def test_readme_opening_names_every_shipped_objective() -> None:
    """The opening paragraph says what exists now: every registered objective, none promised as 'next'."""
    from mmpt.registry import objectives

    opening = README.read_text().split("\n## ", 1)[0]
    missing = [name for name in objectives.names() if f"`{name}`" not in opening]
    assert not missing and not re.search(r"\bnext\b", opening), (missing, opening)
