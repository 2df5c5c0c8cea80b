"""Ranks stop when their launcher dies: ``kill -9`` of torchrun's process group (the ranks run in sessions
of their own) ends every rank within seconds, and the run resumes from its last checkpoint; a process no
launcher started is not watched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from shardkit import fresh_env, tiny_config

from mmpt.training.engine import free_port

pytestmark = [pytest.mark.multirank]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by the parent pids in /proc)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parent_of.items() if p == parent]
        found.update(kids)
        todo.extend(kids)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def latest_step(run: Path) -> int:
    """The newest complete checkpoint's step (0: none yet)."""
    return max((int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")),
               default=0)


def torchrun(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "mmpt.cli", "train", str(cfg), *args]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(400)
def test_killing_torchruns_process_group_stops_the_ranks_and_the_run_resumes(
        color_shards: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    raw = tiny_config(color_shards, run, steps=1000, checkpoint_every=2, log_sample_keys=False)
    raw["data"]["workers"] = 1
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = fresh_env(OMP_NUM_THREADS="1", MMPT_DIST_TIMEOUT="60")
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(torchrun(cfg), env=env, cwd=tmp_path, start_new_session=True, stdout=out,
                                    stderr=out)
    ranks: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while latest_step(run) < 10:  # well into training (ranks starting up may fail on their own)
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks = descendants(launcher.pid)
        assert len(ranks) >= 2 and launcher.poll() is None, log.read_text()[-3000:]  # training, not failing
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in ranks if alive(p)]
        assert not survivors, f"{len(survivors)} rank process(es) outlived their launcher"
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    latest = latest_step(run)
    done = subprocess.run(torchrun(cfg, "--resume", "latest", "--set", f"train.steps={latest + 2}"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"steps {latest}->{latest + 2}" in done.stdout
    assert "taking over the lock" in done.stderr  # the dead run's lock, taken over with a warning


def test_a_process_no_launcher_started_is_not_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmpt.training import launcher

    for var in ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "MMPT_WATCH_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # set by hand (or by an earlier in-process run): not a launcher
    monkeypatch.setenv("RANK", "0")
    assert not launcher.launched()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launcher.launched()
    monkeypatch.setenv("MMPT_WATCH_LAUNCHER", "0")
    assert not launcher.launched()


def test_a_rank_whose_launcher_is_already_gone_stops(tmp_path: Path) -> None:
    """The launcher died before the rank asked the kernel to watch it: the rank sees its new parent and stops."""
    code = ("import os, time; from mmpt.training import launcher; launcher._PARENT = -1; "
            "launcher.watch_launcher(); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], env=fresh_env(MMPT_WATCH_LAUNCHER="1"), capture_output=True,
                          text=True, timeout=25)
    assert proc.returncode == -signal.SIGTERM
    assert "its launcher (pid -1) is gone; stopping" in proc.stderr
