"""The command line: help texts, info, data inspect/write, eval on an export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shardkit import jpeg

from mmpt.cli import main


def test_help_explains_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "mmpt.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("train", "eval", "embed", "export", "data", "demo", "info", "--resume latest"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "mmpt.cli", "train", "--help"], capture_output=True, text=True, timeout=60)
    assert "--set" in out.stdout and "--resume" in out.stdout


def test_info_lists_registries(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "image/vit" in out and "text/transformer" in out and "clip" in out and "clip-tiny" in out
    assert "zero_shot" in out and "deepspeed" in out


def test_data_write_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(5):
        (images / f"im{i}.jpg").write_bytes(jpeg((200, 20 * i, 0)))
        (images / f"im{i}.txt").write_text(f"picture {i}")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    (images / "broken.txt").write_text("bad one")
    assert main(["data", "write", str(images), "--out", str(tmp_path / "sh-%03d.tar"), "--max-count", "3"]) == 0
    assert "wrote 5 samples to 2 shard(s)" in capsys.readouterr().out  # the broken file is skipped, counted
    # a member that is a JPEG by its first bytes but does not decode is found by inspect --decode
    from shardkit import write_tar

    write_tar(tmp_path / "sh-999.tar", [("bad", {"jpg": b"\xff\xd8 broken", "txt": b"bad one"})])
    assert main(["data", "inspect", str(tmp_path / "sh-*.tar"), "--decode"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3 and report["samples"] == 6
    assert report["modalities"] == {"image": 6, "text": 6} and report["extensions"] == {"jpg": 6, "txt": 6}
    assert report["problems"] == {"decode_error_image": 1}


def test_deepspeed_launcher_local_rank_flag_is_accepted() -> None:
    from mmpt.cli import _parser

    args = _parser().parse_args(["--local_rank=1", "export", "run", "--out", "x.safetensors"])
    assert args.command == "export" and args.local_rank == 1


def test_python_dash_m_mmpt_is_the_same_command() -> None:
    out = subprocess.run([sys.executable, "-m", "mmpt", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("mmpt ")
    out = subprocess.run([sys.executable, "-m", "mmpt", "train", "clip-tinny"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(
        "mmpt: error: unknown recipe 'clip-tinny' (did you mean 'clip-tiny'?); shipped: ")
    assert len(out.stderr.strip().splitlines()) == 1


def test_help_lists_every_key_with_a_description(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for key in ("task 'zero_shot' keys:", "label_key (", "classnames (", "task 'linear_probe' keys:", "train_data ("):
        assert key in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "optim.*:" in out and "lr_scale (dict[str, float]" in out and "shuffle_buffer (int, default 1000)" in out
    assert main(["info", "--keys", "--tasks"]) == 0
    out = capsys.readouterr().out
    assert "encoder 'image/vit' keys:" in out and "objective 'clip' keys:" in out and "retrieval" in out
    assert "(undocumented)" not in out


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import mmpt.cli

    def boom(args: object) -> None:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(mmpt.cli, "_info", boom)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "mmpt: error: RuntimeError: something broke second line (run with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        main(["info", "--debug"])


def test_eval_with_a_missing_tasks_file_fails_in_one_line_before_heavy_imports(tmp_path: Path) -> None:
    """Arguments are checked before torch, DeepSpeed or the model load start (seconds): the process that
    refuses a mistyped --tasks-file never imported them."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"never read")
    code = ("import sys\nfrom mmpt.cli import main\nrc = main(sys.argv[1:])\n"
            "print([m for m in ('torch', 'deepspeed', 'mmpt.commands.export', 'timm', 'transformers') if m in sys.modules])\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "eval", str(model), "--tasks-file", "missing.yaml"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == "mmpt: error: --tasks-file missing.yaml: No such file or directory\n"
    assert out.stdout.strip() == "[]"


CHATTER = ("Setting accelerator to CPU", "No CUDA runtime is found", "shm_comm_op", "[WARNING]")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_export_embed_print_no_third_party_chatter(color_shards: list[str], tmp_path: Path) -> None:
    """DeepSpeed's and torch's start-up lines (accelerator, CUDA_HOME, the shared-memory op build) show only
    with --debug."""
    import yaml
    from shardkit import fresh_env, tiny_config

    raw = tiny_config(color_shards, tmp_path / "run", steps=2, checkpoint_every=2, log_sample_keys=False)
    raw["data"]["workers"] = 0
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    commands = (["train", "tiny.yaml"], ["export", "run", "--out", "m.safetensors"],
                ["embed", "m.safetensors", "--data", color_shards[0], "--modality", "image", "--out", "emb"])
    for argv in commands:
        out = subprocess.run([sys.executable, "-m", "mmpt", *argv], capture_output=True, text=True, timeout=240,
                             cwd=tmp_path, env=fresh_env())
        assert out.returncode == 0, out.stderr[-2000:]
        shown = [line for line in (out.stdout + out.stderr).splitlines() if any(c in line for c in CHATTER)]
        assert not shown, f"mmpt {argv[0]}: {shown}"
