"""Two nodes x one process on this machine, launched as on a cluster: two ``torchrun --nnodes 2`` launchers
(static rendezvous), and two ``deepspeed --hostfile --no_ssh --node_rank`` launchers. Each trains ZeRO-2
into one shared run directory, crashes, resumes from the checkpoint; the ranks see their rendezvous and
read disjoint shards (tests/train/_train_ranks.py, scenario ``multinode``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.training.engine import free_port

pytestmark = [pytest.mark.multirank]
HARNESS = Path(__file__).with_name("_train_ranks.py")


def node_commands(launcher: str, node: int, port: int, work: Path) -> list[str]:
    """The launch command of one node."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    # The DeepSpeed runner ssh-es into the hostfile's hosts unless --no_ssh: then each node runs its own
    # launcher with --node_rank, as a scheduler would; host names are only labels then.
    hostfile = work / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_checkpoint_and_resume(launcher: str, color_shards: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMPT_DIST_TIMEOUT": "120"}
    port = free_port()
    nodes = [subprocess.Popen([*node_commands(launcher, node, port, tmp_path), str(HARNESS),
                               str(Path(color_shards[0]).parent), str(tmp_path), "multinode"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=200)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"node_rank{rank}.json").read_text())
        assert seen["rank"] == rank and seen["world"] == 2
        assert seen["env"]["RANK"] == str(rank) and seen["env"]["WORLD_SIZE"] == "2"
        assert seen["env"]["LOCAL_RANK"] == "0"  # one process per node
        node_rank = seen["env"]["GROUP_RANK" if launcher == "torchrun" else "CROSS_RANK"]
        assert node_rank == str(rank)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_00000004").is_dir()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any(r["kind"] == "train" and r["step"] == 4 for r in records)
    shards = []
    for rank in (0, 1):  # the resume re-ran the step after the checkpoint: every step once, own shards
        lines = [json.loads(line) for line in open(run / f"keys_rank{rank}.jsonl")]
        assert sorted(r["step"] for r in lines) == [0, 1, 2, 3]
        shards.append({key.split("_")[0] for r in lines for key in r["keys"]})
    assert shards[0] and shards[1] and not shards[0] & shards[1], shards
