"""Every command and Python example in README.md runs and exits 0 (fast variants: fewer steps/samples).

Commands run in README order in one sandbox folder, as a user would type them: ``mmpt`` as
``python -m mmpt``, ``torchrun`` as ``python -m torch.distributed.run``. Fast variants only append
settings (``--set train.steps=2``, fewer demo samples); they never drop what the README says.
A ``yaml`` block whose first line is ``# <file>`` is written to that file first.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from shardkit import COLORS, fresh_env, jpeg

README = Path(__file__).resolve().parents[1] / "README.md"
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
    elif argv[:3] != [sys.executable, "-m", "mmpt"] and argv[:2] != ["python", "-m"]:
        raise AssertionError(f"README command {line!r}: not an mmpt/torchrun/python -m command")
    rest = argv[argv.index("mmpt") + 1:]
    for key in ("data demo", "train", "demo", "embed"):
        if " ".join(rest[:len(key.split())]) == key:
            if key == "train" and "--resume" in rest:
                return argv + FAST[key] + ["--set", "train.steps=3"]
            return argv + FAST[key]
    return argv


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's own files the README refers to: my_images/ (captioned) and my_val/ (by class)."""
    root = tmp_path_factory.mktemp("readme")
    images = root / "my_images"
    images.mkdir()
    for i, name in enumerate(["cat", *COLORS]):
        color = COLORS.get(name, (200, 120, 40))
        (images / f"{name}.jpg").write_bytes(jpeg(color))
        (images / f"{name}.txt").write_text(f"a {name} square number {i}")
    for name in ("red", "blue"):
        (root / "my_val" / name).mkdir(parents=True)
        for i in range(3):
            (root / "my_val" / name / f"{i}.jpg").write_bytes(jpeg(COLORS[name]))
    for block in blocks("yaml"):
        first, _, body = block.partition("\n")
        if first.startswith("# "):
            (root / first[2:].strip()).write_text(body)
    return root


def test_readme_lists_the_two_commands_and_ci_calls_one() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_commands_and_python_run(sandbox: Path) -> None:
    env = fresh_env(OMP_NUM_THREADS="1", MMPT_DIST_TIMEOUT="120")
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
