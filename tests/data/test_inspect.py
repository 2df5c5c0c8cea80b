"""``mmpt data inspect`` counts shard problems apart from sample problems, like the loader."""

from __future__ import annotations

from pathlib import Path

from shardkit import color_sample, cut_tar, member_spans, write_tar

from mmpt.data.inspect import inspect_shards


def test_inspect_reports_shard_problems_apart_from_samples(tmp_path: Path) -> None:
    full = Path(write_tar(tmp_path / "a-full.tar", [color_sample(f"t{i}", "red") for i in range(6)]))
    cut = cut_tar(full, tmp_path / "b-cut.tar", member_spans(full)["t4.txt"][1] - 10)
    (tmp_path / "c-text.tar").write_text("not a tar\n" * 50)
    report = inspect_shards(str(tmp_path / "*.tar"), progress=False)
    assert report["shards"] == 3
    assert report["samples"] == 6 + 4  # the 4 complete samples before the cut, not the one it splits
    assert report["problems"] == {"cut_by_truncation": 1}
    assert report["shard_problems"] == {"truncated_shard": [cut], "unreadable_shard": [str(tmp_path / "c-text.tar")]}


def test_inspect_decode_names_the_first_keys_per_reason(tmp_path: Path) -> None:
    """Issue 18 item 17: a truncated PNG is counted *and* named, so the user can find it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="PNG")
    png = buf.getvalue()
    samples = [color_sample(f"ok{i}", "red") for i in range(3)]
    samples += [(f"cut{i}", {"png": png[: len(png) // 2], "txt": b"a red square"}) for i in range(5)]
    write_tar(tmp_path / "a.tar", samples)
    report = inspect_shards(str(tmp_path / "a.tar"), decode=True, progress=False)
    assert report["problems"] == {"decode_error_image": 5}
    assert report["problem_keys"] == {"decode_error_image": ["cut0", "cut1", "cut2"]}
