"""Start-up wall time of the commands a user types first, for one or more mmpt source trees run back to back.

    .venv/bin/python bench/startup.py                                   # this checkout
    git archive OLD mmpt | tar -x -C /tmp/old                           # a baseline tree (mmpt/ only)
    .venv/bin/python bench/startup.py --tree before=/tmp/old --tree after=.

Commands (each run ``--repeats`` times, trees alternating, fresh run folders; medians reported):
``mmpt --help``; ``mmpt eval MODEL --tasks-file missing.yaml`` (must fail); ``mmpt train clip-tiny`` for
2 steps on one rank; the README's ``torchrun --nproc_per_node 2 -m mmpt train clip-tiny --set
train.zero_stage=3`` for ``--zero3-steps`` steps; the 1-rank train again with an empty torch extension
cache (``TORCH_EXTENSIONS_DIR``), as on a machine where DeepSpeed never built an op. A tree other than this checkout is put first on
PYTHONPATH (its ``mmpt/``; encoders, objectives and recipes come from the installed checkout).
Prints a table and writes ``bench/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def commands(work: Path, zero3_steps: int) -> dict[str, list[str]]:
    """name -> argv after ``python -m`` (run folders under ``work/runs`` are removed before each run)."""
    runs = work / "runs"
    small = ["--set", "data.shuffle_buffer=50", "--set", "train.progress=false"]
    return {
        "mmpt --help": ["mmpt", "--help"],
        "eval, missing --tasks-file": ["mmpt", "eval", str(work / "model.safetensors"), "--tasks-file",
                                       str(work / "missing.yaml")],
        "train 1 rank, 2 steps": ["mmpt", "train", "clip-tiny", "--set", "train.steps=2",
                                  "--set", f"train.out_dir={runs}/one", *small],
        "train 1 rank, 2 steps, empty op cache": ["mmpt", "train", "clip-tiny", "--set", "train.steps=2",
                                                  "--set", f"train.out_dir={runs}/cold", *small],
        f"torchrun 2 ranks ZeRO-3, {zero3_steps} steps": [
            "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmpt", "train", "clip-tiny",
            "--set", "train.zero_stage=3", "--set", f"train.out_dir={runs}/zero3",
            "--set", f"train.steps={zero3_steps}", *small],
    }


def env_for(tree: Path, work: Path) -> dict[str, str]:
    """The environment of one tree's runs: demo data from ``work``, the tree's mmpt first on the path."""
    env = {**os.environ, "MMPT_DEMO_DATA": str(work / "data")}
    if tree.resolve() != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(tree.resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def timed(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Wall seconds and exit status of ``python -m argv`` (output into ``log``)."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                            cwd=log.parent).returncode
        return time.perf_counter() - t0, rc


def prepare(work: Path, tree: Path) -> None:
    """Demo data and a model export to evaluate (not timed), made with ``tree``."""
    env = env_for(tree, work)
    steps = [["mmpt", "data", "demo", "--out", str(work / "data"), "--train-samples", "1024",
              "--eval-samples", "128"],
             ["mmpt", "train", "clip-tiny", "--set", "train.steps=1", "--set", f"train.out_dir={work}/seed",
              "--set", "train.progress=false"],
             ["mmpt", "export", str(work / "seed"), "--out", str(work / "model.safetensors")]]
    for argv in steps:
        subprocess.run([sys.executable, "-m", *argv], env=env, check=True, capture_output=True, cwd=work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                   help="an mmpt source tree to time (repeatable; default: this checkout)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zero3-steps", type=int, default=4)
    p.add_argument("--only", action="append", default=[], help="time only commands whose name contains this")
    p.add_argument("--work", help="work folder (kept); default: a temporary one, removed")
    p.add_argument("--out", default=str(RESULTS / "startup.json"))
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(ROOT)}
    work = Path(a.work or tempfile.mkdtemp(prefix="mmpt-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare(work, Path(next(iter(trees.values()))))
        cmds = {k: v for k, v in commands(work, a.zero3_steps).items() if not a.only or any(o in k for o in a.only)}
        walls: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in cmds}
        for rep in range(a.repeats):
            for name, argv in cmds.items():
                for label, tree in trees.items():  # back to back: the machine's load hits every tree alike
                    shutil.rmtree(work / "runs", ignore_errors=True)
                    (work / "runs").mkdir()
                    log = work / "runs" / "log.txt"
                    env = env_for(Path(tree), work)
                    if "empty op cache" in name:
                        env["TORCH_EXTENSIONS_DIR"] = str(work / "runs" / "torch_extensions")
                    wall, rc = timed(argv, env, log)
                    if (rc != 0) != name.startswith("eval"):
                        raise SystemExit(f"{label}: {name}: exit {rc}\n{log.read_text()[-3000:]}")
                    walls[name][label].append(round(wall, 2))
                    print(f"  [{rep + 1}/{a.repeats}] {label:8s} {name}: {wall:.2f} s", flush=True)
        table = {c: {t: {"median_s": statistics.median(v), "runs_s": v} for t, v in per.items()}
                 for c, per in walls.items()}
        print(f"\n{'command':40s}" + "".join(f"{t:>12s}" for t in trees))
        for c, per in table.items():
            print(f"{c:40s}" + "".join(f"{per[t]['median_s']:>11.2f}s" for t in trees))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"trees": trees, "repeats": a.repeats,
                                           "load_avg": os.getloadavg(), "cpus": os.cpu_count(),
                                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": table}, indent=1))
        print(f"wrote {a.out}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
