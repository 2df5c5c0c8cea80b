"""Run import-linter's layer contracts (``[tool.importlinter]`` in pyproject.toml) on mmpt as installed.

pyproject.toml installs ``encoders/`` as ``mmpt.encoders`` and ``objectives/`` as ``mmpt.objectives``
(setuptools ``package-dir``); grimp, import-linter's graph builder, reads the package's folder, where
those two are absent. This mirrors the installed layout into a temporary folder (the sources, nothing
else) and runs ``lint-imports`` there. grimp counts imports inside functions too, so a cycle dodged by a
function-level import still fails.

    python tests/lint_imports.py [--root DIR]      # exit 0 when every contract holds
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> installed package folder, as pyproject.toml's package-dir maps them.
LAYOUT = {"mmpt": "mmpt", "encoders": "mmpt/encoders", "objectives": "mmpt/objectives", "recipes": "mmpt/recipes"}


def mirror(root: Path, out: Path) -> Path:
    """Copy the Python sources of ``root`` into ``out`` as the installed package tree; returns ``out``."""
    for src, dst in LAYOUT.items():
        for f in (root / src).rglob("*.py"):
            target = out / dst / f.relative_to(root / src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return out


def lint(root: Path = ROOT, config: Path | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` on a mirror of ``root``, with ``root``'s pyproject.toml unless ``config`` is given."""
    exe = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory() as tmp:
        tree = mirror(root, Path(tmp) / "src")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        return subprocess.run([str(exe), "--no-cache", "--no-logo", "--config", str(config or root / "pyproject.toml")],
                              env=env, cwd=tmp, capture_output=True, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="project folder (default: this checkout)")
    a = p.parse_args()
    res = lint(a.root.resolve())
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.exit(res.returncode)


if __name__ == "__main__":
    main()
