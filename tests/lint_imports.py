"""Run import-linter's layer contracts (``[tool.importlinter]`` in pyproject.toml) on mmpt as installed.

pyproject.toml installs ``encoders/`` as ``mmpt.encoders`` and ``objectives/`` as ``mmpt.objectives``
(setuptools ``package-dir``); grimp, import-linter's graph builder, reads the package's folder, where
those two are absent. This mirrors the installed layout into a temporary folder (the sources, nothing
else) and runs ``lint-imports`` there, then looks for import cycles among all modules (also inside one
layer, which the layer contract does not see). grimp counts imports inside functions too, so a cycle dodged
by a function-level import still fails.

    python tests/lint_imports.py [--root DIR]      # exit 0 when every contract holds
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


# Tarjan's strongly connected components over grimp's graph (run in the mirror's environment).
CYCLES = """
import sys, grimp
g = grimp.build_graph("mmpt")
index, low, stack, on, found = {}, {}, [], set(), []
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in g.find_modules_directly_imported_by(v):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        part = []
        while True:
            w = stack.pop(); on.discard(w); part.append(w)
            if w == v:
                break
        if len(part) > 1:
            found.append(sorted(part))
for m in sorted(g.modules):
    if m not in index:
        visit(m)
for part in found:
    print("import cycle: " + " <-> ".join(part))
print(f"{len(found)} import cycle(s) among {len(g.modules)} modules")
sys.exit(1 if found else 0)
"""


def lint(root: Path = ROOT, config: Path | None = None,
         edit: Callable[[Path], None] | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` and the cycle check on a mirror of ``root`` (``edit`` may change the mirror first),
    with ``root``'s pyproject.toml unless ``config`` is given; output and exit status of both together."""
    exe = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory() as tmp:
        tree = mirror(root, Path(tmp) / "src")
        if edit is not None:
            edit(tree)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        layers = subprocess.run([str(exe), "--no-cache", "--no-logo", "--config", str(config or root / "pyproject.toml")],
                                env=env, cwd=tmp, capture_output=True, text=True)
        cycles = subprocess.run([sys.executable, "-c", CYCLES], env=env, cwd=tmp, capture_output=True, text=True)
        return subprocess.CompletedProcess(layers.args, layers.returncode or cycles.returncode,
                                           layers.stdout + cycles.stdout, layers.stderr + cycles.stderr)


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
