"""Shared pieces of the benchmarks: the tiny CLIP both tools run, demo shards, env, machine, report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
MMPT = BIN / "mmpt"
RESULTS = ROOT / "bench" / "results"
OC_MODEL_NAME = "mmpt-bench-tiny"  # the model-config name OpenCLIP sees (via add_model_config)


@dataclass
class TinyClip:
    """One tiny CLIP, written as an OpenCLIP model config and as mmpt overrides with the same
    architecture: one strided-conv patch stem, CLS pooling, pre-norm blocks with GELU MLPs of ratio 4,
    causal text tower with EOT pooling, linear projections to ``embed_dim``."""

    image_size: int = 64
    patch: int = 8
    width: int = 192
    layers: int = 4
    heads: int = 3
    ctx: int = 32
    embed_dim: int = 128

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise SystemExit(f"--width {self.width} is not a multiple of --heads {self.heads}")
        if self.image_size % self.patch:
            raise SystemExit(f"--image-size {self.image_size} is not a multiple of --patch {self.patch}")

    def openclip_config(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch, "width": self.width,
                               "layers": self.layers, "head_width": self.width // self.heads, "mlp_ratio": 4.0},
                "text_cfg": {"context_length": self.ctx, "vocab_size": 49408, "width": self.width,
                             "heads": self.heads, "layers": self.layers, "mlp_ratio": 4.0}}

    def write_openclip_config(self, folder: Path) -> Path:
        """``folder/<name>.json`` for ``open_clip.add_model_config(folder)``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{OC_MODEL_NAME}.json").write_text(json.dumps(self.openclip_config(), indent=1))
        return folder

    def mmpt_overrides(self) -> list[str]:
        vit = (f"{{name: image/vit, image_size: {self.image_size}, patch_size: {self.patch}, width: {self.width}, "
               f"depth: {self.layers}, heads: {self.heads}, mlp_ratio: 4.0, stem: patch, pool: cls}}")
        txt = (f"{{name: text/transformer, context_length: {self.ctx}, width: {self.width}, depth: {self.layers}, "
               f"heads: {self.heads}, mlp_ratio: 4.0, causal: true, pool: eot}}")
        return [f"model.embed_dim={self.embed_dim}", f"model.encoders.image={vit}", f"model.encoders.text={txt}"]


def add_model_args(p) -> None:
    """The architecture options both benchmarks share."""
    d = TinyClip()
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (shards and model)")
    p.add_argument("--patch", type=int, default=d.patch, help="ViT patch size")
    p.add_argument("--width", type=int, default=d.width, help="width of both towers")
    p.add_argument("--layers", type=int, default=d.layers, help="depth of both towers")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads in both towers")
    p.add_argument("--ctx", type=int, default=d.ctx, help="text context length")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="shared embedding size")


def model_from_args(a) -> TinyClip:
    return TinyClip(a.image_size, a.patch, a.width, a.layers, a.heads, a.ctx, a.embed_dim)


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """The same thread settings for every measured process (and no PYTHONPATH leaking between venvs)."""
    n = str(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def brace(shards: list[Path]) -> str:
    """``[.../demo-train-000000.tar, ..., .../demo-train-000003.tar]`` -> ``.../demo-train-{000000..000003}.tar``."""
    if len(shards) == 1:
        return str(shards[0])
    prefix, first = shards[0].name.removesuffix(".tar").rsplit("-", 1)
    last = shards[-1].name.removesuffix(".tar").rsplit("-", 1)[1]
    if len(shards) != int(last) - int(first) + 1:
        raise SystemExit(f"shards are not one contiguous range: {[s.name for s in shards]}")
    return str(shards[0].parent / f"{prefix}-{{{first}..{last}}}.tar")


def demo_data(out: Path, train: int, eval_: int, image_size: int, threads: int) -> dict[str, list[Path]]:
    """``mmpt data demo`` into ``out`` (not timed); returns the train and eval shards."""
    cmd = [str(MMPT), "data", "demo", "--out", str(out), "--train-samples", str(train),
           "--eval-samples", str(eval_), "--image-size", str(image_size)]
    run_logged(cmd, out.parent / "demo-data.log", thread_env(threads))
    shards = {s: sorted((out / s).glob("*.tar")) for s in ("train", "eval")}
    if not shards["train"] or not shards["eval"]:
        raise SystemExit(f"no shards under {out}")
    return shards


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None,
               check: bool = True) -> tuple[float, int]:
    """Run ``cmd`` with stdout+stderr into ``log``; returns (wall seconds, return code)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
        wall = time.perf_counter() - t0
    if check and rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(map(str, cmd))[:500]}\n--- {log} (tail) ---\n{tail}")
    return wall, rc


def steady_rate(windows: list[tuple[int, int, float]], skip_steps: int, batch: int) -> dict:
    """Steady-state samples/s from log windows ``(first_step, last_step, seconds)``: the windows that
    start after ``skip_steps`` count, as total samples over total seconds (not a mean of rates)."""
    kept = [w for w in windows if w[0] > skip_steps]
    if not kept:
        raise SystemExit(f"no log window starts after step {skip_steps}: use more --steps")
    steps = sum(last - first + 1 for first, last, _ in kept)
    seconds = sum(s for _, _, s in kept)
    return {"samples_per_s": steps * batch / seconds, "steady_steps": steps, "steady_seconds": seconds,
            "first_counted_step": min(w[0] for w in kept)}


def medians(runs: dict[str, list[dict]], keys: tuple[str, ...], keep_logs: bool) -> dict[str, dict]:
    """Per tool: the median of each key over its runs, its [min, max] under ``spread``, plus the runs (log
    paths dropped unless the work dir is kept, since the logs go with it)."""
    import statistics

    if not keep_logs:
        for rs in runs.values():
            for r in rs:
                r.pop("log", None)
    return {tool: {**{k: statistics.median(r[k] for r in rs) for k in keys},
                   "spread": {k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in keys}, "runs": rs}
            for tool, rs in runs.items()}


def machine() -> dict:
    """What the numbers were measured on (plus the load at the time: these machines are shared)."""
    import torch

    cpu_model = ""
    try:
        cpu_model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def report(name: str, rate: str, unit: str, results: dict, out: Path, settings: dict, model: TinyClip,
           extra: dict | None = None) -> float:
    """Print the table and the ratio mmpt/OpenCLIP of ``rate``, write the JSON; returns the ratio."""
    ratio = results["mmpt"][rate] / results["openclip"][rate]
    print()
    print(f"{name}  ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    print(f"{'tool':10s} {unit:>16s} {'wall s':>8s}")
    for tool, v in results.items():
        print(f"{tool:10s} {v[rate]:16.1f} {v['wall_s']:8.1f}")
    print(f"ratio mmpt/OpenCLIP ({unit}): {ratio:.3f}")
    payload = {"benchmark": name, "model": asdict(model), "settings": settings, "results": results,
               "ratio_mmpt_over_openclip": ratio, "machine": machine(), **(extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out)
    print(f"results: {out}")
    return ratio


def main_python() -> str:
    return str(BIN / "python") if (BIN / "python").exists() else sys.executable
