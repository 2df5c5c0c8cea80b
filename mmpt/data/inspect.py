"""``mmpt data inspect``: what is in a set of shards, and which members fail to decode.

Counted as the loader counts: ``problems`` are samples by reason (``cut_by_truncation`` for the sample a
truncation splits; with ``--decode``, the loader's own budget-checked decode), ``problem_keys`` the first
keys of each reason, ``shard_problems`` the shards that are truncated or unreadable, each named once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mmpt.data.budget import decode_within_budget, skip_reason
from mmpt.data.shards import CUT_REASON, ShardEvent, expand_urls, iter_samples

KEYS_PER_REASON = 3


def inspect_shards(pattern: str, decode: bool = False, progress: bool = True) -> dict[str, Any]:
    """Counts of samples, extensions and modalities per shard set, sample problems per reason and the
    shards with a problem; with ``decode``, decode errors per reason using each modality's default decoder
    under its byte budget. ``problem_keys`` names the first few samples of each reason."""
    from tqdm import tqdm

    from mmpt.registry import modalities

    urls = expand_urls(pattern)
    specs = {name: modalities.get(name)() for name in modalities.names()}
    by_ext = {ext: name for name, spec in specs.items() for ext in spec.extensions}
    exts: Counter[str] = Counter()
    mods: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    problem_keys: dict[str, list[str]] = {}

    def problem(reason: str, key: str) -> None:
        problems[reason] += 1
        keys = problem_keys.setdefault(reason, [])
        if len(keys) < KEYS_PER_REASON:
            keys.append(key)

    shard_problems: dict[str, list[str]] = {}
    samples, example_keys = 0, []
    for url in tqdm(urls, disable=not progress, desc="inspect", unit="shard"):
        for s in iter_samples(url):
            if isinstance(s, ShardEvent):
                shard_problems.setdefault(s.reason, []).append(s.url)
                continue
            if s.get("__cut__"):
                problem(CUT_REASON, s["__key__"])
                continue
            samples += 1
            if len(example_keys) < 5:
                example_keys.append(s["__key__"])
            members = [k for k in s if not k.startswith("__")]
            exts.update(members)
            present = {by_ext[e] for e in members if e in by_ext}
            mods.update(present)
            for ext in members:
                if not s[ext]:
                    problem(f"empty_{ext}", s["__key__"])
                elif decode and ext in by_ext:
                    try:
                        decode_within_budget(specs[by_ext[ext]], s[ext], ext)
                    except Exception as exc:  # report, never stop: the point is to find every bad member
                        problem(skip_reason(exc, by_ext[ext]), s["__key__"])
    return {"shards": len(urls), "samples": samples, "example_keys": example_keys,
            "extensions": dict(exts), "modalities": dict(mods), "problems": dict(problems),
            "problem_keys": dict(sorted(problem_keys.items())), "shard_problems": dict(sorted(shard_problems.items()))}
