"""A checkpoint's loader position is data: check it against the run that wrote it before replaying it.

Resume skips each logical worker's first ``consumed`` raw samples, so a crafted or damaged
``rank_<r>.json`` (``consumed`` of 1e9) would make a resume read shards for hours with no output. A
worker cannot have consumed more than the samples its rank drew in the checkpoint's steps plus the
samples it skipped; DeepSpeed's ``global_samples`` (restored with the engine) counts the samples drawn
over the run's whole history, batch-size changes on earlier resumes included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmpt.data.loader import Loader, LoaderState
from mmpt.data.shards import SHARD_REASONS
from mmpt.training.checkpoint import CheckpointError, saved_run
from mmpt.training.rank0 import first_from_any_rank


def resume_loader_state(ckpt: Path, rank_state: dict[str, Any], engine: Any, cfg: Any, shards: set[str],
                        rank: int, world: int) -> LoaderState:
    """This rank's loader position from ``rank_state``, refused on every rank (one line naming the file and
    key) when any rank's position is impossible for the run restored into ``engine``."""
    drawn = max(int(getattr(engine, "global_samples", 0) or 0), int(engine.global_steps) * engine.train_batch_size())
    path = ckpt / f"rank_{rank}.json"
    problem = loader_problem(rank_state.get("loader"), per_rank=math.ceil(drawn / world),
                             workers=max(cfg.data.workers, 1), shards=shards,
                             any_shard=_sources_changed(ckpt, cfg))
    first = first_from_any_rank(f"{path}: {problem}" if problem else None)
    if first:
        raise CheckpointError(f"{first}; the checkpoint is damaged or crafted")
    return Loader.state_from_dict(rank_state["loader"])


def loader_problem(state: Any, *, per_rank: int, workers: int, shards: set[str], any_shard: bool = False) -> str | None:
    """What is impossible in a saved loader state (``loader.<key>: ...``), or None: counts are non-negative
    integers, one entry per data worker, no worker consumed more than ``per_rank`` drawn samples plus its
    own skips, no reason skipped more samples than were consumed, shard events name configured shards."""
    if not isinstance(state, dict):
        return f"loader: expected a mapping, got {type(state).__name__}"
    if not _count(state.get("batches")):
        return f"loader.batches: expected a non-negative integer, got {state.get('batches')!r}"
    consumed, skips, events = state.get("consumed"), state.get("skips"), state.get("shards", [{}] * workers)
    for key, value in (("consumed", consumed), ("skips", skips), ("shards", events)):
        if not isinstance(value, list):
            return f"loader.{key}: expected a list (one entry per data worker), got {type(value).__name__}"
        if len(value) != workers:
            return f"loader.{key}: {len(value)} data workers, this run has {workers} (data.workers)"
    for w, (n, reasons, urls) in enumerate(zip(consumed, skips, events, strict=True)):
        problem = _worker_problem(w, n, reasons, urls, per_rank, shards, any_shard)
        if problem:
            return problem
    return None


def _worker_problem(w: int, consumed: Any, skips: Any, events: Any, per_rank: int, shards: set[str],
                    any_shard: bool) -> str | None:
    if not _count(consumed):
        return f"loader.consumed[{w}]: expected a non-negative integer, got {consumed!r}"
    if not isinstance(skips, dict) or not all(_count(v) for v in skips.values()):
        return f"loader.skips[{w}]: expected a mapping of reason -> non-negative integer, got {skips!r:.80}"
    for reason, n in skips.items():
        if reason not in SHARD_REASONS and n > consumed:  # states of older versions counted shard events here
            return f"loader.skips[{w}].{reason}: {n} skipped samples, but the worker consumed only {consumed}"
    skipped = sum(n for r, n in skips.items() if r not in SHARD_REASONS)
    if consumed > per_rank + skipped:
        return (f"loader.consumed[{w}]: {consumed} raw samples, but the checkpoint's steps drew at most {per_rank} "
                f"samples on this rank (+ {skipped} skipped)")
    if not isinstance(events, dict):
        return f"loader.shards[{w}]: expected a mapping of reason -> shard list, got {type(events).__name__}"
    for reason, urls in events.items():
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            return f"loader.shards[{w}].{reason}: expected a list of shard names"
        foreign = next((u for u in urls if u not in shards), None)
        if foreign is not None and not any_shard:
            return f"loader.shards[{w}].{reason}: {foreign[:80]!r} is not one of the configured shards (data.sources)"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sources_changed(ckpt: Path, cfg: Any) -> bool:
    """Whether ``data.sources`` changed since ``ckpt`` (a warned change): its shard events may name old shards."""
    saved = ((saved_run(ckpt) or {}).get("config") or {}).get("data", {})
    now = json.loads(json.dumps(cfg.to_dict()["data"], default=str))
    return saved.get("sources") != now.get("sources")
