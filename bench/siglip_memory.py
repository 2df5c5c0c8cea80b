"""Peak memory of one rank's SigLIP loss, forward + backward, against the world size: mmpt vs OpenCLIP.

One rank of a world of W is simulated on one process, no process group: the other W - 1 ranks' text
blocks are generated where the exchange would deliver them (mmpt: ``exchange_order``'s order, each
block's gradient accumulator dropped once the block moves on, as the ring sends it away; OpenCLIP:
``SigLipLoss._loss`` on its own block and then every received block, ``negative_only``, summed into
one loss as its ``forward`` does, each received block behind an identity whose backward drops the
gradient, as ``neighbour_exchange_with_grad`` sends it away). Inputs are built before measuring.

Each point runs in a fresh subprocess, twice: once under ``torch.profiler`` with ``profile_memory``
(the peak of the running sum of the CPU allocator's allocations and frees during forward + backward:
what the loss itself holds, to the byte), once bare for the resident-set peak (``ru_maxrss`` after
minus the resident set before, with glibc's mmap threshold fixed at 64 KiB so freed blocks leave the
resident set). Printed as a table and written to ``bench/results/siglip_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, main_python, thread_env  # noqa: E402

WORLDS = (4, 16, 64, 256)
FLAT = 0.10  # goal: mmpt's peak within +-10% from the smallest world to the largest


def child(impl: str, world: int, batch: int, dim: int, profiled: bool) -> dict:
    """One rank's loss forward + backward at ``world``; its peak above the state at entry."""
    import torch
    import torch.nn.functional as F

    def block(origin: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(origin)
        return F.normalize(torch.randn(batch, dim, generator=g), dim=-1)

    a = block(10_000).requires_grad_(True)
    b = block(0).requires_grad_(True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    if impl == "mmpt":
        from mmpt.objectives.siglip import blockwise_sigmoid_loss, exchange_order

        def feed(own: torch.Tensor, grads: bool):
            for origin in exchange_order(0, world, "bidir"):
                blk = own if origin == 0 else block(origin)
                yield origin, blk, torch.zeros(blk.shape) if grads else None

        def run() -> torch.Tensor:
            total, best = blockwise_sigmoid_loss(a, b, scale, bias, rank=0, world=world, feed=feed)
            del best  # siglip_loss turns the maxima into accuracies before backward
            loss = total / batch
            loss.backward()
            return loss
    else:
        from open_clip.loss import SigLipLoss

        class Received(torch.autograd.Function):
            """A block as the exchange delivers it: its gradient leaves for its owner (dropped here)."""

            @staticmethod
            def forward(ctx, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g: torch.Tensor) -> tuple:  # type: ignore[override]
                return None, torch.zeros(())

        token = torch.zeros((), requires_grad=True)
        sl = SigLipLoss()

        def run() -> torch.Tensor:
            loss = sl._loss(a, b, scale, bias)
            for origin in range(1, world):
                loss = loss + sl._loss(a, Received.apply(block(origin), token), scale, bias, negative_only=True)
            loss.backward()
            return loss

    (torch.randn(8, 8) @ torch.randn(8, 8)).sum()  # thread pools and kernels load before measuring
    t0 = time.perf_counter()
    if profiled:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = run()
        seconds = time.perf_counter() - t0
        live = peak = 0
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        return {"impl": impl, "world": world, "alloc_peak_mb": round(peak / 2**20, 3),
                "alloc_left_mb": round(live / 2**20, 3), "loss": loss.item(), "profiled_s": round(seconds, 2)}
    before = rss_mb()
    loss = run()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"impl": impl, "world": world, "rss_peak_delta_mb": round(peak - before, 1), "rss_before_mb": round(before, 1),
            "loss": loss.item(), "seconds": round(seconds, 2)}


def rss_mb() -> float:
    """This process's resident set now (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run_child(impl: str, world: int, a: argparse.Namespace, profiled: bool) -> dict:
    """One point in a fresh process; its JSON line back."""
    cmd = [main_python(), __file__, "--child", impl, "--world", str(world), "--batch", str(a.batch), "--dim",
           str(a.dim)] + (["--profiled"] if profiled else [])
    env = thread_env(a.threads, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{impl} world {world} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="local batch (rows per rank)")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS), help="simulated world sizes")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each child")
    p.add_argument("--out", type=Path, default=RESULTS / "siglip_memory.json", help="JSON results file")
    p.add_argument("--child", choices=["mmpt", "openclip"], help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.world, a.batch, a.dim, a.profiled)), flush=True)
        return
    rows = []
    for world in a.worlds:
        for impl in ("mmpt", "openclip"):
            row = run_child(impl, world, a, profiled=True)
            row.update(run_child(impl, world, a, profiled=False))
            rows.append(row)
            print(f"{impl:9s} world {world:4d}: allocator peak {row['alloc_peak_mb']:9.2f} MB, "
                  f"RSS peak delta {row['rss_peak_delta_mb']:8.1f} MB, {row['seconds']:6.2f} s, loss {row['loss']:.6f}",
                  flush=True)
    print(f"\none rank's SigLIP loss forward + backward, local batch {a.batch}, dim {a.dim}, fp32 CPU, "
          f"{a.threads} thread(s)")
    print(f"{'world':>6s} {'mmpt alloc MB':>14s} {'OpenCLIP alloc MB':>18s} {'mmpt RSS MB':>12s} {'OpenCLIP RSS MB':>16s}")
    by = {(r["impl"], r["world"]): r for r in rows}
    for world in a.worlds:
        m, o = by["mmpt", world], by["openclip", world]
        print(f"{world:6d} {m['alloc_peak_mb']:14.2f} {o['alloc_peak_mb']:18.2f} {m['rss_peak_delta_mb']:12.1f} "
              f"{o['rss_peak_delta_mb']:16.1f}")
    ours = [by["mmpt", w]["alloc_peak_mb"] for w in a.worlds]
    spread = max(ours) / min(ours) - 1
    flat = max(abs(x / ours[0] - 1) for x in ours) <= FLAT
    grows = by["openclip", a.worlds[-1]]["alloc_peak_mb"] / by["openclip", a.worlds[0]]["alloc_peak_mb"]
    print(f"mmpt allocator peak: max/min - 1 = {spread:.1%} over worlds {a.worlds[0]}..{a.worlds[-1]} "
          f"(goal within +-{FLAT:.0%} of world {a.worlds[0]}: {'met' if flat else 'NOT met'}); "
          f"OpenCLIP grows {grows:.1f}x")
    payload = {"benchmark": "siglip_memory",
               "settings": {"batch": a.batch, "dim": a.dim, "threads": a.threads, "precision": "fp32",
                            "device": "cpu", "exchange": "bidir", "worlds": a.worlds,
                            "measure": "alloc_peak_mb: torch.profiler profile_memory, peak of the running sum of "
                                       "CPU allocator allocs/frees during forward+backward; rss_peak_delta_mb: "
                                       "ru_maxrss after minus RSS before, separate run, MALLOC_MMAP_THRESHOLD_=65536"},
               "results": rows, "mmpt_spread": spread, "goal_flat_within": FLAT, "goal_met": flat,
               "openclip_growth": grows, "machine": machine()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
