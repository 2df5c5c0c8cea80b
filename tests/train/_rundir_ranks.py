"""Two ranks meet a crafted loader position on rank 1 only, then a full disk on rank 1 only: every rank
must raise the same one-line error (none left waiting in a collective), then resume from the intact step.

usage: torchrun --nproc_per_node 2 tests/train/_rundir_ranks.py SHARD_DIR OUT_DIR (prints one line per event)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runkit import reseal, small  # noqa: E402

from mmpt.config import load_config  # noqa: E402
from mmpt.registry import ConfigError  # noqa: E402
from mmpt.training import checkpoint  # noqa: E402
from mmpt.training.engine import init_distributed  # noqa: E402
from mmpt.training.loop import train  # noqa: E402


def say(line: str) -> None:
    """One line in one write: the two ranks share a pipe, and print's separate writes interleave."""
    os.write(1, (line + "\n").encode())

def main() -> None:
    shards, out = sorted(str(p) for p in Path(sys.argv[1]).glob("*.tar")), Path(sys.argv[2])
    rank = init_distributed().rank

    def cfg(run: str, **kw: int) -> object:
        return load_config(small(shards, out / run, zero_stage=2, **kw))

    train(cfg("run"))
    if rank == 0:
        ckpt = shutil.copytree(out / "run", out / "bad") / "checkpoints" / "step_00000004"
        state = json.loads((ckpt / "rank_1.json").read_text())
        state["loader"]["consumed"] = [10**9]
        (ckpt / "rank_1.json").write_text(json.dumps(state))
        reseal(ckpt)
    dist.barrier()
    try:
        train(cfg("bad", steps=6), resume="latest")
        say(f"rank {rank}: crafted position accepted")
    except ConfigError as exc:
        say(f"rank {rank}: refused: {exc}")
    real = torch.save

    def full_on_rank1(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if rank == 1 and "step_00000004.tmp" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        real(obj, f, *args, **kwargs)

    torch.save = full_on_rank1
    checkpoint.free_bytes = lambda path: 0  # the disk is full (torch's writer error names no cause)
    try:
        train(cfg("full"))
        say(f"rank {rank}: full disk unnoticed")
    except ConfigError as exc:
        say(f"rank {rank}: disk full: {exc}")
    torch.save = real
    summary = train(cfg("full"), resume="latest")
    say(f"rank {rank}: resumed {summary.start}->{summary.steps}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
