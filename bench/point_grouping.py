"""Point grouping: farthest-point sampling + kNN time (pure torch, batched) and its share of a training step.

Times ``group_points`` (FPS of G centres + kNN of K neighbours, the stem's grouping) on random clouds of
``--points`` x ``--batch`` (default ULIP's 8,192 points, batch 32, G = 512, K = 32), median of
``--repeats`` after one warm-up. Then times whole training steps (forward, backward, AdamW step) of a small
point-cloud CLIP (``point_cloud/point_transformer`` + ``text/transformer``, CLIP loss) built by mmpt's
``build_pretrainer`` at the same point settings, and of the ``ulip-tiny`` recipe's towers at its own
settings (``--recipe``; skipped with a warning when the recipe is missing), and reports grouping time /
step time. Grouping runs without gradients inside the step, so the share is the grouping time of that
step's batch over the step's time, both measured here, one after the other, with the same thread count.

    .venv/bin/python bench/point_grouping.py [--device cuda] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine  # noqa: E402


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def grouping_seconds(batch: int, points: int, groups: int, k: int, device: str, repeats: int,
                     sync: Callable[[], None]) -> dict:
    """FPS + kNN, and each alone, on (batch, points, 3) random clouds: median and all runs in seconds."""
    import torch

    from mmpt.encoders.point_cloud import farthest_point_sample, gather_points, group_points, knn

    torch.manual_seed(0)
    xyz = torch.randn(batch, points, 3, device=device)
    start = torch.randint(0, points, (batch,), device=device)
    centres = gather_points(xyz, farthest_point_sample(xyz, groups, start))
    runs = {"fps_knn": timed(lambda: group_points(xyz, groups, k, start), repeats, sync),
            "fps": timed(lambda: farthest_point_sample(xyz, groups, start), repeats, sync),
            "knn": timed(lambda: knn(xyz, centres, k), repeats, sync)}
    return {name: {"median_s": statistics.median(r), "runs_s": [round(x, 5) for x in r]} for name, r in runs.items()}


def step_seconds(point_cfg: dict, text_cfg: dict, embed_dim: int, batch: int, device: str, repeats: int,
                 sync: Callable[[], None]) -> dict:
    """Median seconds of a full training step of a point-cloud/text CLIP, and of its batch's grouping."""
    import torch

    from mmpt.config import load_config
    from mmpt.contracts import Batch
    from mmpt.encoders.point_cloud import group_points
    from mmpt.pretrainer import build_pretrainer

    raw = {"name": "bench-point-clip", "seed": 0,
           "model": {"embed_dim": embed_dim, "encoders": {"point_cloud": point_cfg, "text": text_cfg}},
           "objectives": {"clip": {"name": "clip", "pairs": [["point_cloud", "text"]]}},
           "data": {"sources": ["unused"], "batch_size": batch}, "train": {"out_dir": "unused"}}
    model = build_pretrainer(load_config(raw)).to(device).train()
    pc = model.model.encoders["point_cloud"]
    captions = [f"a shape number {i}" for i in range(batch)]
    text = {k: v.to(device) for k, v in model.model.data["text"].prepare(captions).items()}
    points = torch.randn(batch, point_cfg["num_points"], pc.in_chans, device=device)
    b = Batch(fields={"point_cloud": {"points": points}, "text": text},
              present={m: torch.ones(batch, dtype=torch.bool, device=device) for m in ("point_cloud", "text")},
              keys=[str(i) for i in range(batch)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = torch.randint(0, points.shape[1], (batch,), device=device)
    steps = timed(step, repeats, sync)
    grouping = timed(lambda: group_points(points, pc.groups, pc.group_size, start), repeats, sync)
    n_params = sum(p.numel() for p in model.parameters())
    return {"step_median_s": statistics.median(steps), "grouping_median_s": statistics.median(grouping),
            "grouping_share": statistics.median(grouping) / statistics.median(steps),
            "step_runs_s": [round(x, 4) for x in steps], "grouping_runs_s": [round(x, 5) for x in grouping],
            "batch": batch, "params_m": round(n_params / 1e6, 2), "point_cloud": point_cfg, "text": text_cfg}


def recipe_towers(path: Path) -> tuple[dict, dict, int, int] | None:
    """(point-cloud encoder, text encoder, embed_dim, batch size) of a recipe, or None if it has neither."""
    from mmpt.config import load_yaml

    if not path.exists():
        warnings.warn(f"bench: recipe {path} not found; its step share is not measured", stacklevel=2)
        return None
    raw = load_yaml(path)
    enc = raw["model"]["encoders"]
    if "point_cloud" not in enc or "text" not in enc:
        warnings.warn(f"bench: recipe {path} has no point_cloud + text towers; its step share is not measured",
                      stacklevel=2)
        return None
    return enc["point_cloud"], enc["text"], raw["model"].get("embed_dim", 128), raw["data"]["batch_size"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="clouds per batch")
    p.add_argument("--points", type=int, default=8192, help="points per cloud")
    p.add_argument("--groups", type=int, default=512, help="FPS centres G")
    p.add_argument("--group-size", type=int, default=32, help="kNN neighbours K")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    p.add_argument("--step-repeats", type=int, default=3, help="timed training steps after one warm-up")
    p.add_argument("--width", type=int, default=192, help="transformer width of the small point-cloud CLIP")
    p.add_argument("--depth", type=int, default=4, help="transformer depth of both towers")
    p.add_argument("--pointnet-hidden", type=int, default=64, help="first hidden size of the mini-PointNet")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "ulip-tiny.yaml"), help="recipe whose step share is measured too")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--out", default=str(RESULTS / "point_grouping.json"), help="JSON result file")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    settings = {k: v for k, v in vars(a).items() if k not in ("out",)}
    result: dict = {"benchmark": "point_grouping", "settings": settings,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}
    result["grouping"] = grouping_seconds(a.batch, a.points, a.groups, a.group_size, a.device, a.repeats, sync)
    g = result["grouping"]
    print(f"FPS + kNN, batch {a.batch} x {a.points} points, G={a.groups}, K={a.group_size}, {a.device}: "
          f"{g['fps_knn']['median_s'] * 1e3:.1f} ms (FPS {g['fps']['median_s'] * 1e3:.1f} ms, "
          f"kNN {g['knn']['median_s'] * 1e3:.1f} ms), median of {a.repeats}")
    small = {"name": "point_cloud/point_transformer", "num_points": a.points, "groups": a.groups,
             "group_size": a.group_size, "width": a.width, "depth": a.depth, "heads": max(1, a.width // 64),
             "pointnet_hidden": a.pointnet_hidden}
    text = {"name": "text/transformer", "context_length": 32, "width": a.width, "depth": a.depth,
            "heads": max(1, a.width // 64)}
    cases = {"small_point_clip": (small, text, 128, a.batch)}
    towers = recipe_towers(Path(a.recipe))
    if towers:
        cases["recipe"] = towers
    result["steps"] = {}
    for name, (pc_cfg, text_cfg, dim, batch) in cases.items():
        s = step_seconds(pc_cfg, text_cfg, dim, batch, a.device, a.step_repeats, sync)
        result["steps"][name] = s
        print(f"{name}: step {s['step_median_s']:.3f} s, grouping {s['grouping_median_s'] * 1e3:.1f} ms = "
              f"{100 * s['grouping_share']:.1f}% of the step (batch {batch}, {s['params_m']} M params)")
    result["machine"] = machine()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
