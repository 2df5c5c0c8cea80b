"""Bad data seen from a training run: a clear error instead of a hang, shard events reported apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from shardkit import (
    bad_samples,
    color_sample,
    cut_tar,
    member_spans,
    tiny_config,
    write_color_shards,
    write_tar,
)

from mmpt.config import load_config
from mmpt.data.shards import DataError
from mmpt.training.loop import train


@pytest.mark.timeout(120)
def test_training_on_all_bad_shards_fails_fast_naming_them(tmp_path: Path) -> None:
    # samples_per_epoch set: no up-front count, the stream itself must notice (it spun at step 0 before)
    shard = write_tar(tmp_path / "allbad.tar", bad_samples(16))
    raw = tiny_config([shard], tmp_path / "run")
    raw["data"]["samples_per_epoch"] = 100
    with pytest.raises(DataError, match=r"allbad\.tar.*decode_error_image="):
        train(load_config(raw))


@pytest.mark.timeout(180)
def test_run_summary_counts_a_truncated_shard_once(tmp_path: Path) -> None:
    full = Path(write_tar(tmp_path / "full.tar", [color_sample(f"t{i:03d}", "blue") for i in range(12)]))
    cut = cut_tar(full, tmp_path / "truncated.tar", member_spans(full)["t008.txt"][1] - 10)
    good = write_color_shards(tmp_path, counts=(30,), prefix="g")
    raw = tiny_config([cut, *good], tmp_path / "run", steps=5, checkpoint_every=5)
    summary = train(load_config(raw))
    text = str(summary)
    assert "; 1 truncated shard," in text, text
    assert summary.skips["truncated_shard"] == 1
    assert set(summary.skips) <= {"truncated_shard", "cut_by_truncation"}
