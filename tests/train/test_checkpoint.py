"""Run directories are data: crafted pickles never run, damaged checkpoints are detected (fallback
to the newest intact one), resume refuses or records config changes, logs hold each step once after
a crash, and one run directory has one writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runkit import copy_run, reseal, small
from shardkit import fresh_env

import mmpt
from mmpt.cli import main as cli_main
from mmpt.commands.export import consolidate, export
from mmpt.config import load_config
from mmpt.registry import ConfigError
from mmpt.training.checkpoint import InjectedFault
from mmpt.training.loop import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(color_shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Finished 4-step runs (checkpoints at steps 2 and 4) at ZeRO 0 and 2."""
    root = tmp_path_factory.mktemp("ckpt_runs")
    out = {}
    for stage in (0, 2):
        out[stage] = root / f"z{stage}"
        train(load_config(small(color_shards, out[stage], zero_stage=stage)))
    return out


class Payload:
    """Unpickling this creates a marker file (a stand-in for any code an attacker wants run)."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(ckpt: Path, name: str, marker: Path) -> None:
    Payload.marker = str(marker)
    path = ckpt / name
    blob = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted test file
    blob["payload"] = Payload()
    torch.save(blob, path)
    reseal(ckpt)


@pytest.mark.parametrize(("stage", "name"), [(0, "mp_rank_00_model_states.pt"),
                                             (2, "mp_rank_00_model_states.pt"),
                                             (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
@pytest.mark.parametrize("entry", ["load", "export", "resume"])
def test_crafted_pickle_never_runs(runs: dict[int, Path], color_shards: list[str], tmp_path: Path, stage: int,
                                   name: str, entry: str) -> None:
    run = copy_run(runs[stage], tmp_path / "run")
    marker = tmp_path / "pwned"
    plant_payload(run / "checkpoints" / "step_00000004", name, marker)
    with pytest.raises(ConfigError, match=f"{name}: refusing to unpickle io.open"):
        if entry == "load":
            mmpt.load(str(run))
        elif entry == "export":
            export(run, tmp_path / "m.safetensors")
        else:
            train(load_config(small(color_shards, run, zero_stage=stage, steps=6)), resume="latest")
    assert not marker.exists(), "the payload ran"


def test_raw_pickle_is_refused_in_one_clear_line(runs: dict[int, Path], tmp_path: Path) -> None:
    """A bare pickle where torch.save's archive belongs: refused naming the file and what was expected, with
    no text cut mid-word (torch's multi-line weights-only message was cut to its last 200 characters)."""
    import pickle

    run = copy_run(runs[0], tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    path = ckpt / "mp_rank_00_model_states.pt"
    Payload.marker = str(tmp_path / "pwned")
    blob = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted test file
    path.write_bytes(pickle.dumps({**blob, "payload": Payload()}))
    reseal(ckpt)
    with pytest.raises(ConfigError) as info:
        mmpt.load(str(run))
    text = str(info.value)
    assert text.startswith(f"{path}: refusing to unpickle a raw pickle (not a torch.save archive")
    assert "expected a torch.save file holding only tensors" in text
    assert "\n" not in text and "ckler" not in text and len(text) < len(str(path)) + 300
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("stage", [0, 2])
def test_real_checkpoints_load_under_the_restricted_unpickler(runs: dict[int, Path], stage: int) -> None:
    state, cfg, ckpt = consolidate(runs[stage])
    assert ckpt.name == "step_00000004" and cfg.train.zero_stage == stage and len(state) > 10


def _damage(ckpt: Path, kind: str) -> str:
    """Damage ``ckpt`` (its run's newest); returns a fragment the warning must contain."""
    big = ckpt / "mp_rank_00_model_states.pt"
    if kind == "missing_file":
        big.unlink()
        return "mp_rank_00_model_states.pt is missing"
    if kind == "truncated_file":
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
        return "mp_rank_00_model_states.pt has"
    if kind == "flipped_byte":
        data = bytearray(big.read_bytes())
        data[len(data) - 4096] ^= 0x10  # inside tensor data: the pickle still loads without a checksum
        big.write_bytes(bytes(data))
        return "does not match its checksum"
    if kind == "bad_rank_json":
        (ckpt / "rank_0.json").write_text("{not json")
        return "rank_0.json"
    latest = ckpt.parent / "latest"
    if kind == "empty_latest":
        latest.write_text("")
        return "latest is empty"
    assert kind == "dangling_latest"
    shutil.rmtree(ckpt)
    return "names step_00000004, which does not exist"


KINDS = ["missing_file", "truncated_file", "flipped_byte", "bad_rank_json", "empty_latest", "dangling_latest"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back_with_a_warning(runs: dict[int, Path], tmp_path: Path,
                                                             kind: str) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004"
    fragment = _damage(newest, kind)
    with pytest.warns(UserWarning, match=fragment):
        _, _, ckpt = consolidate(run)
    # an empty `latest` says nothing, so the newest intact checkpoint is taken
    assert ckpt.name == ("step_00000004" if kind == "empty_latest" else "step_00000002")
    if kind not in ("empty_latest", "dangling_latest"):
        with pytest.raises(ConfigError, match=fragment):  # named explicitly: no fallback
            consolidate(newest)


def test_resume_latest_falls_back_and_fails_clearly_when_nothing_is_intact(
        runs: dict[int, Path], color_shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    _damage(run / "checkpoints" / "step_00000004", "flipped_byte")
    with pytest.warns(UserWarning, match="step_00000004.*does not match its checksum"):
        summary = train(load_config(small(color_shards, run, steps=5)), resume="latest")
    assert "steps 2->5" in capsys.readouterr().out and summary.steps == 5
    for ckpt in (run / "checkpoints").glob("step_*"):
        _damage(ckpt, "truncated_file")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        train(load_config(small(color_shards, run, steps=6)), resume="latest")


def test_bad_rank_state_with_a_matching_manifest_is_one_line(runs: dict[int, Path], color_shards: list[str],
                                                             tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    (ckpt / "rank_0.json").write_text('{"loader": {}}')
    reseal(ckpt)
    with pytest.raises(ConfigError, match="rank_0.json: not a valid rank state"):
        train(load_config(small(color_shards, run, steps=5)), resume=str(ckpt))


def test_resume_latest_without_checkpoint_says_it_starts_fresh(color_shards: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    train(load_config(small(color_shards, tmp_path / "run", steps=1)), resume="latest")
    assert "no checkpoint in" in capsys.readouterr().out


def test_export_without_checkpoint_or_config_is_one_line(runs: dict[int, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint"):
        consolidate(tmp_path / "empty")
    assert cli_main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpt: error:") and "no checkpoint" in err and "\n" not in err
    run = copy_run(runs[0], tmp_path / "run")
    (run / "config.yaml").unlink()
    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / "checkpoint.json").unlink(missing_ok=True)
        reseal(ckpt)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpt: error:") and "config" in err and "\n" not in err


def test_resume_refuses_a_different_zero_stage(runs: dict[int, Path], color_shards: list[str],
                                               tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"train.zero_stage.*checkpoint.*0.*now 2"):
        train(load_config(small(color_shards, run, steps=5, zero_stage=2)), resume="latest")


def test_resume_refuses_another_world_size_and_a_changed_model(runs: dict[int, Path], color_shards: list[str],
                                                               tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "world_size": 2}))
    reseal(ckpt)
    with pytest.raises(ConfigError, match=r"written by 2 rank\(s\), this run has 1"):
        train(load_config(small(color_shards, run, steps=5)), resume="latest")
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    reseal(ckpt)
    raw = small(color_shards, run, steps=5)
    raw["model"]["embed_dim"] = 16
    with pytest.warns(UserWarning, match="model.embed_dim: 32 -> 16"), \
            pytest.raises(ConfigError, match="cannot load it into this model.*size mismatch"):
        train(load_config(raw), resume="latest")


def test_resume_warns_and_records_config_changes(runs: dict[int, Path], color_shards: list[str],
                                                 tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run")
    raw = small(color_shards, run, steps=5, log_every=5)  # steps/log_every are meant to change: no warning
    raw["optim"]["lr"] = 2e-3
    with pytest.warns(UserWarning, match=r"optim.lr: 0.001 -> 0.002") as record:
        train(load_config(raw), resume="latest")
    assert not any("train.steps" in str(w.message) or "log_every" in str(w.message) for w in record)
    assert load_config(str(run / "config.yaml")).optim.lr == 2e-3
    history = sorted(p.name for p in (run / "configs").iterdir())
    assert history == ["config-00000000.yaml", "config-00000004.yaml"]
    assert load_config(str(run / "configs" / history[0])).optim.lr == 1e-3
    changes = [json.loads(x) for x in open(run / "metrics.jsonl") if '"resume"' in x]
    assert changes and changes[-1]["changed"]["optim.lr"] == [0.001, 0.002]


def test_logs_hold_each_step_once_after_a_crash(color_shards: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(InjectedFault):
        train(load_config(small(color_shards, run, steps=6, crash_at_step=5)))
    train(load_config(small(color_shards, run, steps=6)), resume="latest")
    keys = [json.loads(x) for x in open(run / "keys_rank0.jsonl")]
    assert [(r["step"], r["micro"]) for r in keys] == [(s, 0) for s in range(6)]
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_logs_survive_kill_9_and_the_next_run_takes_over(color_shards: list[str], tmp_path: Path) -> None:
    """A real SIGKILL right after step 3 (checkpoint at 2): records up to the checkpoint were synced; the
    resume takes over the dead run's lock with a warning and every step is logged once."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from shardkit import tiny_config
        from mmpt.config import load_config
        from mmpt.training import checkpoint
        from mmpt.training.loop import train

        class KillNow(Exception):  # the injected fault becomes a SIGKILL inside the running loop
            def __init__(self, *args):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.InjectedFault = KillNow
        raw = tiny_config({color_shards!r}, {str(run)!r}, steps=4, checkpoint_every=2, log_every=1, crash_at_step=3)
        raw["data"]["workers"] = 1
        train(load_config(raw))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=fresh_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err[-2000:]
    keys = [json.loads(x) for x in open(run / "keys_rank0.jsonl")]
    assert {r["step"] for r in keys} >= {0, 1}
    assert f'"pid": {proc.pid}' in (run / "mmpt.lock").read_text()
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {proc.pid}"):
        train(load_config(small(color_shards, run, steps=4)), resume="latest")
    keys = [json.loads(x) for x in open(run / "keys_rank0.jsonl")]
    assert [r["step"] for r in keys] == [0, 1, 2, 3]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl") if '"train"' in x] == [1, 2, 3, 4]


HOLDER = """
import sys, time
from mmpt.training.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(color_shards: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"{run}.*in use by pid {holder.pid} on "):
            train(load_config(small(color_shards, run, steps=1)))
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file names a dead pid
    assert str(holder.pid) in (run / "mmpt.lock").read_text()
    with pytest.warns(UserWarning, match=f"taking over.*pid {holder.pid}"):
        train(load_config(small(color_shards, run, steps=1)))
