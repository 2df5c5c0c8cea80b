"""``mmpt data write`` as a user runs it: relative paths, flags, keys, json members, one-line errors."""

from __future__ import annotations

import csv
import json
import re
import tarfile
from pathlib import Path

import pytest
from shardkit import jpeg

from mmpt.cli import main
from mmpt.data.shards import DataError
from mmpt.data.writer import write_shards


def read_samples(pattern: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard matching ``pattern`` (a glob in one folder)."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(Path(pattern).parent.glob(Path(pattern).name)):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def image_folder(root: Path, n: int = 3, captions: bool = True) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"im{i}.jpg").write_bytes(jpeg((200, 40 * i, 0)))
        if captions:
            (root / f"im{i}.txt").write_text(f"picture {i}")
    return root


def csv_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "mmpt: error: " in line]  # beside a progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_relative_folder_is_read_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    # Before the fix every image was a "missing file" (imgs/imgs/im0.jpg) and the command exited 0.
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imgs")
    assert main(["data", "write", "imgs", "--out", "out/s-%03d.tar"]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    assert len(read_samples("out/s-*.tar")) == 3


def test_relative_table_paths_resolve_next_to_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "data" / "img")
    csv_table(tmp_path / "data" / "pairs.csv", [{"file": "img/im0.jpg", "caption": "x"}])
    assert write_shards("data/pairs.csv", "out/s-%03d.tar", progress=False).written == 1


def test_writing_nothing_is_an_error_naming_input_and_reasons(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = image_folder(tmp_path / "nocaps", captions=False)
    assert main(["data", "write", str(folder), "--out", str(tmp_path / "s-%03d.tar")]) == 2
    err = one_line_error(capsys)
    assert "nocaps" in err and "0 samples" in err and "missing caption file: 3" in err
    with pytest.raises(DataError, match="missing caption file: 3"):
        write_shards(folder, str(tmp_path / "s-%03d.tar"), progress=False)


def test_column_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image_folder(tmp_path / "img")
    table = csv_table(tmp_path / "t.csv", [{"picture": "img/im0.jpg", "label": "red"}])
    out = str(tmp_path / "o" / "s-%03d.tar")
    assert main(["data", "write", str(table), "--out", out]) == 2  # "picture" is found by its values' extension
    assert "--caption-column" in one_line_error(capsys)
    assert main(["data", "write", str(table), "--out", out, "--path-column", "picture"]) == 2
    assert "--caption-column" in one_line_error(capsys)
    bare = csv_table(tmp_path / "bare.csv", [{"picture": "img/im0", "label": "red"}])
    assert main(["data", "write", str(bare), "--out", out]) == 2
    assert "--path-column" in one_line_error(capsys)
    assert main(["data", "write", str(table), "--out", out, "--path-column", "picture",
                 "--caption-column", "label"]) == 0
    (sample,) = read_samples(str(tmp_path / "o" / "s-*.tar")).values()
    assert sample["txt"] == b"red" and "json" not in sample


def test_keys_are_unique_across_tables_by_default_and_prefix_is_settable(tmp_path: Path) -> None:
    image_folder(tmp_path / "img")
    rows = [{"file": str(tmp_path / "img" / f"im{i}.jpg"), "caption": f"c{i}"} for i in range(3)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        table = csv_table(tmp_path / name / "train.csv", rows)  # same name, same rows: keys must still differ
        assert main(["data", "write", str(table), "--out", str(tmp_path / name / "s-%03d.tar")]) == 0
    a = read_samples(str(tmp_path / "a" / "s-*.tar"))
    b = read_samples(str(tmp_path / "b" / "s-*.tar"))
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    assert all(re.fullmatch(r"train-[0-9a-f]{8}_00000000[0-2]", k) for k in a), sorted(a)
    assert main(["data", "write", str(tmp_path / "a" / "train.csv"), "--out", str(tmp_path / "p" / "s-%03d.tar"),
                 "--key-prefix", "laion_part1_"]) == 0
    assert sorted(read_samples(str(tmp_path / "p" / "s-*.tar"))) == [f"laion_part1_{i:09d}" for i in range(3)]


def test_extra_columns_go_into_json_with_numbers_kept(tmp_path: Path) -> None:
    image_folder(tmp_path / "img")
    table = csv_table(tmp_path / "t.csv", [{"file": "img/im0.jpg", "caption": "x", "width": "8", "score": "0.25",
                                            "id": "007", "note": "", "big": "-12", "sci": "1e3", "word": "nan"}])
    summary = write_shards(table, str(tmp_path / "s-%03d.tar"), key_prefix="", progress=False)
    (sample,) = read_samples(str(summary.shards[0])).values()
    assert json.loads(sample["json"]) == {"width": 8, "score": 0.25, "id": "007", "note": "", "big": -12,
                                          "sci": 1000.0, "word": "nan"}


@pytest.mark.parametrize("case", ["missing", "type", "pattern", "prefix"])
def test_bad_input_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    image_folder(tmp_path / "img")
    good = csv_table(tmp_path / "t.csv", [{"file": "img/im0.jpg", "caption": "x"}])
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    table, out, extra, named = {
        "missing": (tmp_path / "nope.csv", "s-%03d.tar", [], "nope.csv"),
        "type": (tmp_path / "t.xlsx", "s-%03d.tar", [], ".xlsx"),
        "pattern": (good, "shard.tar", [], "shard.tar"),
        "prefix": (good, "s-%03d.tar", ["--key-prefix", "a.b"], "--key-prefix"),
    }[case]
    assert main(["data", "write", str(table), "--out", str(tmp_path / out), *extra]) == 2
    assert named in one_line_error(capsys)


def test_write_help_documents_json_member(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["data", "write", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--path-column", "--caption-column", "--key-prefix", "json"):
        assert flag in out
