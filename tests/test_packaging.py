"""The wheel builds offline and, installed on its own, imports mmpt.encoders/objectives and finds recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_wheel_installs_and_imports(tmp_path: Path) -> None:
    import shutil

    # Built from a copy of the sources: setuptools reuses the tree's build/ folder, where modules a later
    # commit moved or deleted would still be packed.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".peer-venv", "build", "runs", "*.egg-info",
                                                             ".git", "__pycache__", ".pytest_cache", ".ruff_cache"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(wheels), str(src)], check=True, cwd=tmp_path, timeout=240)
    wheel = next(wheels.glob("mmpt-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, cwd=tmp_path, timeout=120)
    probe = (
        "import mmpt, mmpt.encoders.image, mmpt.objectives.contrastive\n"
        "from importlib import resources\n"
        "from mmpt.registry import encoders, objectives\n"
        "from mmpt.config import load_config\n"
        f"assert mmpt.__file__.startswith({str(site)!r}), mmpt.__file__\n"
        "assert 'image/vit' in encoders.names() and 'clip' in objectives.names()\n"
        "assert resources.files('mmpt.recipes').joinpath('clip-tiny.yaml').is_file()\n"
        "print(load_config('clip-tiny').name)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("clip-tiny")
    assert not any(p.name in ("encoders", "objectives") for p in site.iterdir()), "top-level module leaked"
