"""How skips are reported: sample skips apart from shard events, in the run summary and the step logs."""

from __future__ import annotations

from mmpt.data.loader import format_skips, skip_counts
from mmpt.training.loop import RunSummary


def test_skip_counts_sum_samples_and_count_distinct_shards() -> None:
    skips = [{"decode_error_image": 10}, {"decode_error_image": 6, "cut_by_truncation": 2}]
    shards = [{"truncated_shard": ["a.tar"]}, {"truncated_shard": ["a.tar"], "unreadable_shard": ["b.tar", "c.tar"]}]
    assert skip_counts(skips, shards) == {"decode_error_image": 16, "cut_by_truncation": 2, "truncated_shard": 1,
                                          "unreadable_shard": 2}


def test_run_summary_reports_shard_events_apart_from_samples() -> None:
    # Before: "skipped 17 samples (decode_error_image=16, truncated_shard=1)", a shard counted as a sample.
    summary = RunSummary("run", 5, 1.0, 10.0, 0.5, {"decode_error_image": 16, "truncated_shard": 1})
    assert "skipped 16 samples (decode_error_image=16); 1 truncated shard," in str(summary)
    assert "skipped 0 samples, checkpoint" in str(RunSummary("run", 5, 1.0, 10.0, 0.5, {}))
    assert format_skips({"unreadable_shard": 2}) == "skipped 0 samples; 2 unreadable shards"


def test_loader_state_counts_shards_once_over_workers() -> None:
    from mmpt.data.loader import LoaderState

    state = LoaderState(3, [5, 5], [{"empty_jpg": 1}, {"truncated_shard": 4}],  # a state saved before the split
                        [{"truncated_shard": ["a.tar"]}, {"truncated_shard": ["a.tar"]}])
    assert state.total_skips() == {"empty_jpg": 1}
    assert state.counts() == {"empty_jpg": 1, "truncated_shard": 1}
