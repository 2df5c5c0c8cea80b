"""``mmpt data write`` resumes: a re-run keeps the finished shards, writes each key once, and gives the same
bytes as an uninterrupted run; worker processes give the same bytes as none."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from shardkit import COLORS, jpeg

from mmpt.cli import main
from mmpt.data.shards import DataError
from mmpt.data.writer import ShardWriter, write_shards


def image_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    names = list(COLORS)
    for i in range(n):
        (root / f"im{i:04d}.jpg").write_bytes(jpeg(COLORS[names[i % 4]], size=16 + i % 7))
        (root / f"im{i:04d}.txt").write_text(f"a {names[i % 4]} square")
    return root


def shard_keys(folder: Path) -> list[str]:
    keys = []
    for path in sorted(folder.glob("s-*.tar")):
        with tarfile.open(path) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    return keys


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_interrupted_run_resumes_without_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    folder = image_folder(tmp_path / "imgs", 25)
    (folder / "im0003.txt").unlink()  # a skipped row is counted again, never written
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    write_shards(folder, str(clean / "s-%03d.tar"), max_count=4, workers=0, progress=False)

    real_write = ShardWriter.write
    calls = {"n": 0}

    def dying_write(self, key, members):
        calls["n"] += 1
        if calls["n"] == 11:  # shards 0 and 1 are finished, shard 2 holds two samples
            raise KeyboardInterrupt
        real_write(self, key, members)

    monkeypatch.setattr(ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, str(broken / "s-%03d.tar"), max_count=4, workers=0, progress=False)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert sorted(p.name for p in broken.iterdir()) == ["s-000.tar", "s-001.tar"]
    (broken / "s-002.tar.tmp").write_bytes(b"left by a killed run")  # SIGKILL leaves the unfinished shard

    assert main(["data", "write", str(folder), "--out", str(broken / "s-%03d.tar"), "--max-count", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrote 24 samples to 6 shard(s)" in out and "8 of them by an earlier run" in out
    assert "skipped missing caption file: 1" in out
    keys = shard_keys(broken)
    assert len(keys) == len(set(keys)) == 24
    assert shard_bytes(broken) == shard_bytes(clean)  # no .tmp left, the same bytes as one clean run

    # a finished output re-run: nothing rewritten, nothing duplicated
    before = shard_bytes(broken)
    summary = write_shards(folder, str(broken / "s-%03d.tar"), max_count=4, workers=0, progress=False)
    assert summary.written == summary.resumed == 24 and len(summary.shards) == 6
    assert shard_bytes(broken) == before


def test_shards_of_another_input_are_refused(tmp_path: Path) -> None:
    a = image_folder(tmp_path / "a", 3)
    b = image_folder(tmp_path / "b", 4)
    write_shards(a, str(tmp_path / "out" / "s-%03d.tar"), workers=0, progress=False)
    with pytest.raises(DataError, match=r"s-000\.tar.*not from this input"):
        write_shards(b, str(tmp_path / "out" / "s-%03d.tar"), workers=0, progress=False)


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", 300)  # over the in-process threshold
    (folder / "im0100.jpg").write_bytes(jpeg((1, 2, 3))[:60])  # truncated: skipped the same way
    one = write_shards(folder, str(tmp_path / "one" / "s-%03d.tar"), max_count=64, workers=0, progress=False)
    two = write_shards(folder, str(tmp_path / "two" / "s-%03d.tar"), max_count=64, workers=2, progress=False)
    assert one.written == two.written == 299 and one.skipped == two.skipped == {"decode_error_image": 1}
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
