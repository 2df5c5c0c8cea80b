"""A plugin modality gets ``mmpt data write`` through the ``ModalityData`` contract alone: the toy plugin of
tests/test_plugin.py declares only ``extensions`` and ``decode``; its files are written (and validated by its
own decode), and a training step runs on the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import yaml
from shardkit import fresh_env
from test_plugin import make_plugin, toy_recipe


def test_plugin_modality_is_written_through_the_contract(tmp_path: Path) -> None:
    site = tmp_path / "site"
    make_plugin(site)
    folder = tmp_path / "toys"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        (folder / f"t{i:02d}.toy").write_bytes(rng.normal(size=8).astype(np.float32).tobytes())
        (folder / f"t{i:02d}.txt").write_text(f"sample number {i % 5}")
    (folder / "t12.toy").write_bytes(b"\0" * 5)  # not whole float32s: the plugin's own decode refuses it
    (folder / "t12.txt").write_text("broken")
    recipe = toy_recipe([str(tmp_path / "out" / "toy-000.tar")], tmp_path / "run", batch_size=4)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(recipe))
    script = textwrap.dedent(f"""
        import sys
        from mmpt.cli import main
        if main(["data", "write", {str(folder)!r}, "--out", {str(tmp_path / 'out' / 'toy-%03d.tar')!r},
                 "--key-prefix", ""]):
            sys.exit("write failed")
        sys.exit(main(["train", {str(tmp_path / 'toy.yaml')!r}]))
    """)
    env = fresh_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "wrote 12 samples" in out.stdout and "skipped decode_error_toy: 1 (first: 000000012)" in out.stdout
    with tarfile.open(tmp_path / "out" / "toy-000.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("000000003.toy").read() == (folder / "t03.toy").read_bytes()
    assert names[:2] == ["000000000.toy", "000000000.txt"] and len(names) == 24
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 1 and isinstance(r.get("loss"), float) for r in steps), steps


def test_contract_defaults_store_a_file_as_it_is() -> None:
    import pytest

    from mmpt.contracts import ModalityData, SampleRejected

    class Bare(ModalityData):
        modality = "bare"
        extensions = ("bin", "raw")

    side = Bare()
    assert side.source_suffixes() == ("bin", "raw")
    (sample,) = side.source_samples(b"\x01\x02", "raw")
    assert sample.members == {"raw": b"\x01\x02"} and sample.caption is None and sample.meta == {}
    with pytest.raises(SampleRejected) as refused:
        side.source_samples(b"x", "png")
    assert refused.value.reason == "unsupported_format"
    with pytest.raises(SampleRejected, match="must name a file"):
        side.inline_members("inline text")
