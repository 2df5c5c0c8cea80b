"""The peer virtualenv for OpenCLIP's own trainer: ``bench/.peer-venv``.

OpenCLIP 3.3's trainer (``open_clip_train``) fails at its first batch with webdataset 1.0.x
(``KeyError: 'fname'``) and needs pandas, while mmpt needs webdataset 1.0.x: the trainer therefore
runs from a separate, self-contained venv with the same torch build as the project's
(torch 2.11.0 / torchvision 0.26.0 from PyPI) plus ``open_clip_torch[training]==3.3.0``,
``webdataset==0.2.86`` and ``pandas``.

Idempotent: a stamp file records the requirement set once the install has been verified; a later
call with the same requirements returns at once, a changed set (or ``--force``) rebuilds the venv.

    python bench/peer_env.py            # create if needed, print the peer python path
    python bench/peer_env.py --check    # print the path if ready, exit 1 otherwise (installs nothing)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / ".peer-venv"
STAMP = PEER / ".peer-env-stamp.json"
LOCK = Path(tempfile.gettempdir()) / "mmpt-bench-peer-venv.lock"  # outside the repo: nothing to ignore

# torch and torchvision first in the list: the same versions (and so the same PyPI build) as .venv
REQUIREMENTS = [
    "torch==2.11.0",
    "torchvision==0.26.0",
    "open_clip_torch[training]==3.3.0",
    "webdataset==0.2.86",
    "pandas",
]

_VERIFY = r"""
import json, torch, torchvision, webdataset, open_clip, open_clip_train.main, pandas
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                  "open_clip": open_clip.__version__, "webdataset": getattr(webdataset, "__version__", "?"),
                  "pandas": pandas.__version__}))
"""


def peer_python(peer: Path = PEER) -> Path:
    return peer / "bin" / "python"


def _base_python() -> str:
    """The interpreter behind the current venv (same Python version as .venv, hence the same wheels)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _stamp_ok() -> bool:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("requirements") == REQUIREMENTS and peer_python().exists()


def is_ready() -> bool:
    return _stamp_ok()


def ensure_peer_env(force: bool = False, quiet: bool = True) -> Path:
    """Create (if needed) the peer venv and return its python. Safe to call concurrently."""
    if not force and _stamp_ok():
        return peer_python()
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the stamp
        if not force and _stamp_ok():
            return peer_python()
        STAMP.unlink(missing_ok=True)
        print(f"peer env: creating {PEER} (torch + open_clip_torch[training] + webdataset 0.2.86; "
              f"downloads several GB unless pip's cache has them)", file=sys.stderr, flush=True)
        # --clear: a half-built or differently built venv from an earlier attempt is replaced
        subprocess.run([_base_python(), "-m", "venv", "--clear", str(PEER)], check=True)
        py = str(peer_python())
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"] + (["-q"] if quiet else [])
        subprocess.run(pip + REQUIREMENTS[:2], check=True)
        subprocess.run(pip + REQUIREMENTS, check=True)  # torch already satisfied: pins stay
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        versions = json.loads(subprocess.run([py, "-c", _VERIFY], check=True, capture_output=True, text=True,
                                             env=env).stdout.strip().splitlines()[-1])
        if not versions["webdataset"].startswith("0.2.86"):
            raise SystemExit(f"peer env: expected webdataset 0.2.86, got {versions['webdataset']}")
        STAMP.write_text(json.dumps({"requirements": REQUIREMENTS, "versions": versions,
                                     "python": _base_python(), "created": time.strftime("%Y-%m-%d %H:%M:%S")},
                                    indent=1))
        print(f"peer env: ready {json.dumps(versions)}", file=sys.stderr, flush=True)
    return peer_python()


def versions() -> dict:
    """Package versions recorded when the peer env was built ({} if not built)."""
    try:
        return json.loads(STAMP.read_text()).get("versions", {})
    except (OSError, ValueError):
        return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    p.add_argument("--check", action="store_true", help="only report whether the peer env is ready")
    p.add_argument("--verbose", action="store_true", help="show pip's output")
    a = p.parse_args()
    if a.check:
        if is_ready():
            print(peer_python())
            return
        print(f"peer env not ready: {PEER}", file=sys.stderr)
        raise SystemExit(1)
    print(ensure_peer_env(force=a.force, quiet=not a.verbose))


if __name__ == "__main__":
    main()
