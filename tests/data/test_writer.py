"""ShardWriter (rolling, determinism, atomic names, key checks) and write_shards (tables, folders, skips)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shardkit import read_shards

from mmpt.data.shards import DataError
from mmpt.data.writer import ShardWriter, WriteSummary, write_shards


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def write_samples(pattern: str, count: int, payload: int = 100, **limits) -> ShardWriter:
    with ShardWriter(pattern, **limits) as writer:
        for i in range(count):
            writer.write(f"s{i:04d}", {"txt": f"caption {i}", "bin": bytes([i % 256]) * payload})
    return writer


def test_rolls_by_count_and_keeps_order(tmp_path: Path) -> None:
    writer = write_samples(str(tmp_path / "out" / "train-%06d.tar"), 7, max_count=3)
    assert [p.name for p in writer.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    counts = [len(read_shards([p])) for p in writer.shards]
    assert counts == [3, 3, 1]
    samples = read_shards(writer.shards)
    assert [key for key, _ in samples] == [f"s{i:04d}" for i in range(7)]
    assert samples[4][1] == {"txt": b"caption 4", "bin": bytes([4]) * 100}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in writer.shards]


def test_rolls_by_size(tmp_path: Path) -> None:
    max_size = 40 * 1024
    writer = write_samples(str(tmp_path / "s-%03d.tar"), 30, payload=5000, max_size=max_size)
    assert len(writer.shards) > 3
    assert all(p.stat().st_size <= max_size for p in writer.shards)
    assert len(read_shards(writer.shards)) == 30


def test_oversized_sample_gets_its_own_shard(tmp_path: Path) -> None:
    writer = write_samples(str(tmp_path / "s-%03d.tar"), 3, payload=50_000, max_size=20_000)
    assert [len(read_shards([p])) for p in writer.shards] == [1, 1, 1]


def test_members_are_byte_deterministic(tmp_path: Path) -> None:
    first = write_samples(str(tmp_path / "a" / "s-%03d.tar"), 5).shards
    second = write_samples(str(tmp_path / "b" / "s-%03d.tar"), 5).shards
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    with tarfile.open(first[0]) as tar:
        member = tar.getmembers()[0]
    assert (member.mtime, member.mode, member.uid, member.gid, member.uname) == (0, 0o444, 0, 0, "")


def test_shard_keeps_tmp_name_until_finished(tmp_path: Path) -> None:
    writer = ShardWriter(str(tmp_path / "s-%03d.tar"), max_count=2)
    writer.write("a", {"txt": b"x"})
    assert [p.name for p in tmp_path.iterdir()] == ["s-000.tar.tmp"]
    writer.write("b", {"txt": b"x"})
    writer.write("c", {"txt": b"x"})  # rolls: shard 0 is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000.tar", "s-001.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000.tar", "s-001.tar"]


def test_crash_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "s-%03d.tar"), max_count=2) as writer:
        for key in "abc":
            writer.write(key, {"txt": b"x"})
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["s-000.tar"]
    assert writer.shards == [tmp_path / "s-000.tar"]


@pytest.mark.parametrize("key", ["a.b", "dir/x.y", ""])
def test_key_with_dot_is_rejected(tmp_path: Path, key: str) -> None:
    with ShardWriter(str(tmp_path / "s-%03d.tar")) as writer, pytest.raises(ValueError, match="key"):
        writer.write(key, {"txt": b"x"})
    assert writer.shards == []


def test_bad_key_error_names_the_key(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "s-%03d.tar")) as writer, pytest.raises(ValueError, match=r"'img\.001'"):
        writer.write("img.001", {"jpg": b"x"})


def test_repeated_key_and_bad_pattern_are_rejected(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "s-%03d.tar")) as writer:
        writer.write("a", {"txt": b"x"})
        with pytest.raises(ValueError, match="twice"):
            writer.write("a", {"txt": b"y"})
    with pytest.raises(ValueError, match="%-format"):
        ShardWriter(str(tmp_path / "shard.tar"))


# write_shards -----------------------------------------------------------------------------------

ROWS = [
    {"file": "img/a.jpg", "caption": "a red square", "width": 8},
    {"file": "img/b.png", "caption": "a green square", "width": 8},
    {"file": "img/missing.jpg", "caption": "gone", "width": 8},
    {"file": "img/c.webp", "caption": "a blue square", "width": 8},
]


def make_images(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(image_bytes("JPEG", (200, 30, 30)))
    (root / "img" / "b.png").write_bytes(image_bytes("PNG", (30, 200, 30)))
    (root / "img" / "c.webp").write_bytes(image_bytes("WEBP", (30, 30, 200)))


def write_table(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_write_shards_from_table(tmp_path: Path, suffix: str) -> None:
    make_images(tmp_path / "data")
    table = tmp_path / "data" / f"pairs{suffix}"
    write_table(table, ROWS)
    summary = write_shards(table, str(tmp_path / "out" / "s-%06d.tar"), max_count=2, key_prefix="", progress=False)
    assert isinstance(summary, WriteSummary)
    assert summary.written == 3 and summary.skipped == {"missing file": 1}
    assert len(summary.shards) == 2
    samples = dict(read_shards(summary.shards))
    # Keys are row numbers, so the skipped row 2 leaves a gap.
    assert sorted(samples) == ["000000000", "000000001", "000000003"]
    assert set(samples["000000000"]) == {"jpg", "txt", "json"}
    assert samples["000000000"]["jpg"] == (tmp_path / "data" / "img" / "a.jpg").read_bytes()
    assert "png" in samples["000000001"] and "webp" in samples["000000003"]
    assert samples["000000003"]["txt"] == b"a blue square"
    assert json.loads(samples["000000001"]["json"])["width"] == 8  # a number in every table type
    text = str(summary)
    # a headline, then one line per reason naming its first keys
    assert text.splitlines()[0].startswith("wrote 3 samples to 2 shard(s)") and text.count("\n") == 1
    assert text.splitlines()[1].strip() == "skipped missing file: 1 (first: 000000002)"


def test_write_shards_auto_detects_other_column_names(tmp_path: Path) -> None:
    make_images(tmp_path)
    table = tmp_path / "pairs.jsonl"
    write_table(table, [{"Image": "img/a.jpg", "TEXT": "red"}, {"Image": str(tmp_path / "img/b.png"), "TEXT": ""}])
    summary = write_shards(table, str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert summary.written == 1 and summary.skipped == {"empty caption": 1}
    (_, sample), = read_shards(summary.shards)
    assert set(sample) == {"jpg", "txt"}  # no other columns, no json member


def test_write_shards_column_errors_name_file_and_columns(tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    write_table(table, [{"picture": "a", "caption": "x"}])  # no name or extension says what "picture" holds
    with pytest.raises(ValueError, match=r"pairs\.csv.*picture, caption"):
        write_shards(table, str(tmp_path / "s-%06d.tar"), progress=False)
    with pytest.raises(ValueError, match=r"pairs\.csv.*'label'.*picture, caption"):
        write_shards(table, str(tmp_path / "s-%06d.tar"), path_column="picture", caption_column="label", progress=False)
    with pytest.raises(ValueError, match=r"pairs\.csv.*'picture'.*--column MODALITY=picture"):
        write_shards(table, str(tmp_path / "s-%06d.tar"), path_column="picture", progress=False)
    with pytest.raises(DataError, match=r"pairs\.csv.*0 samples.*missing file: 1"):
        write_shards(table, str(tmp_path / "s-%06d.tar"), columns={"image": "picture", "text": "caption"},
                     progress=False)


def test_write_shards_counts_bad_files_by_reason(tmp_path: Path) -> None:
    make_images(tmp_path)
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "text.jpg").write_bytes(b"not an image")
    (tmp_path / "img" / "real_png.jpg").write_bytes(image_bytes("PNG"))
    table = tmp_path / "pairs.csv"
    rows = [{"path": f"img/{name}", "text": "c"} for name in ("empty.jpg", "text.jpg", "real_png.jpg", "nope.jpg")]
    write_table(table, rows + [{"path": "https://example.com/x.jpg", "text": "c"}, {"path": "", "text": "c"}])
    summary = write_shards(table, str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert summary.written == 1
    assert summary.skipped == {"empty file": 1, "unsupported_format_image": 1, "missing file": 1,
                               "remote url (download first)": 1, "empty path": 1}
    (_, sample), = read_shards(summary.shards)
    assert "png" in sample  # stored under the extension its bytes have, not its file name


def test_write_shards_from_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_images(folder)
    (folder / "img" / "sub").mkdir()
    (folder / "img" / "sub" / "d.jpg").write_bytes(image_bytes("JPEG"))
    (folder / "img" / "e.gif").write_bytes(image_bytes("GIF"))
    for name, caption in [("a", "red"), ("b", "green"), ("c", "blue"), ("e", "gif")]:
        (folder / "img" / f"{name}.txt").write_text(caption + "\n")
    (folder / "img" / "a.json").write_text('{"source": "camera"}')
    summary = write_shards(folder, str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert summary.written == 3
    assert summary.skipped == {"missing caption file": 1, "unsupported format .gif": 1}
    samples = [s for _, s in read_shards(summary.shards)]
    assert [s["txt"] for s in samples] == [b"red", b"green", b"blue"]
    assert json.loads(samples[0]["json"]) == {"source": "camera"}
    assert "json" not in samples[1]


def test_write_shards_rejects_unknown_table_type(tmp_path: Path) -> None:
    table = tmp_path / "pairs.xlsx"
    table.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.xlsx"):
        write_shards(table, str(tmp_path / "s-%06d.tar"), progress=False)
