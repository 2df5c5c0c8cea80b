"""``mmpt data curate``: MetaCLIP's curation (Xu et al. 2023, "Demystifying CLIP Data") of caption shards.

Two passes over the shards, each shard in a worker process of its own:

1. *Matching.* Every caption is matched against a list of metadata entries by substring matching with an
   Aho-Corasick automaton (pyahocorasick), as MetaCLIP's ``substr_matching`` does: the caption is wrapped in
   spaces, the punctuation ``, . ; : ? ! ``\\` `` is spaced out and tabs/newlines become spaces; each entry
   is matched as `` entry `` (so ``red`` matches "a red star", not "tired"); case is kept. A sample's matched
   entries form a set; ``count[e]`` is the number of samples matching ``e``.
2. *Balancing.* ``count`` is raised to ``t`` where lower and each entry gets ``p[e] = t / count[e]`` (1 for
   the tail, ``t/count`` for the head). A sample is kept when any of its matched entries keeps it: one draw
   ``u < p[e]`` per (sample, matched entry), MetaCLIP's vectorised ``balance_sampling``. A sample matching
   nothing is dropped. The draws of a shard come from a generator keyed by (seed, the shard's name), so the
   result is the same for any worker count and shard order.

The kept samples are copied (every member, byte for byte) in input order into ``--out`` with
:class:`~mmpt.data.writer.ShardWriter`, next to ``<out folder>/curation.json`` (per-entry counts before and
after) and ``curation.png`` (entry counts by rank, before and after, log scale).
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpt.data.shards import DataError, ShardEvent, expand_urls, iter_samples
from mmpt.registry import ConfigError

if TYPE_CHECKING:  # numpy is imported where used: `mmpt --help` imports this module
    import numpy as np

_PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")
_SPACES = ("\t", "\n", "\r")


def spaced(text: str) -> str:
    """A caption as MetaCLIP matches it: padded with spaces, its punctuation spaced out, tabs/newlines as spaces."""
    text = f" {text} "
    for p in _PUNCTUATION:
        text = text.replace(p, f" {p} ")
    for c in _SPACES:
        text = text.replace(c, " ")
    return text


def build_automaton(entries: Sequence[str]) -> Any:
    """An Aho-Corasick automaton over `` entry `` for each entry, whose matches yield the entry's index."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", i)
    automaton.make_automaton()
    return automaton


def match(automaton: Any, text: str) -> list[int]:
    """Sorted indices of the entries found in ``text`` (each once)."""
    return sorted({i for _, i in automaton.iter(spaced(text))})


def read_entries(path: str | Path) -> list[str]:
    """Metadata entries: a JSON list of strings, or a text file with one entry a line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--metadata {path}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--metadata {path}: not valid JSON ({exc}); expected a list of strings") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ConfigError(f"--metadata {path}: expected a JSON list of strings")
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        raise ConfigError(f"--metadata {path}: no entries (expected one entry a line or a JSON list of strings)")
    if any(not e.strip() for e in entries):
        raise ConfigError(f"--metadata {path}: an entry is blank; every entry needs a character")
    seen: set[str] = set()
    duplicate = next((e for e in entries if e in seen or seen.add(e)), None)
    if duplicate is not None:
        raise ConfigError(f"--metadata {path}: entry {duplicate!r} is listed twice")
    return entries


@dataclass
class ShardMatches:
    """One shard's matching pass: its samples' keys and matched entry ids (CSR: ``ids[offsets[i]:offsets[i+1]]``)."""

    url: str
    keys: list[str]
    offsets: np.ndarray
    ids: np.ndarray
    no_caption: int = 0
    problems: list[str] = field(default_factory=list)


_WORKER: dict[str, Any] = {}


def _init_worker(entries: Sequence[str], caption_exts: Sequence[str]) -> None:
    _WORKER["automaton"] = build_automaton(entries)
    _WORKER["exts"] = tuple(caption_exts)


def _match_shard(url: str) -> ShardMatches:
    """Pass 1 on one shard (runs in a worker initialised by :func:`_init_worker`)."""
    import numpy as np

    automaton, exts = _WORKER["automaton"], _WORKER["exts"]
    keys: list[str] = []
    offsets, ids, no_caption, problems = [0], [], 0, []
    for sample in iter_samples(url):
        if isinstance(sample, ShardEvent):
            problems.append(sample.reason)
            continue
        if sample.get("__cut__"):
            continue
        ext = next((e for e in exts if e in sample), None)
        found = match(automaton, sample[ext].decode("utf-8", errors="replace")) if ext else []
        no_caption += ext is None
        keys.append(sample["__key__"])
        ids.extend(found)
        offsets.append(len(ids))
    return ShardMatches(url, keys, np.asarray(offsets, np.int64), np.asarray(ids, np.int64), no_caption, problems)


def shard_generator(seed: int, url: str) -> np.random.Generator:
    """The balancing draws of one shard: keyed by the seed and the shard's file name, not its position."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(Path(url).name.encode()),)))


def entry_probabilities(counts: np.ndarray, t: int) -> np.ndarray:
    """MetaCLIP's ``t / max(count, t)`` per entry (1 for entries seen at most ``t`` times)."""
    import numpy as np

    return t / np.maximum(counts.astype(np.float64), t)


def balance(shard: ShardMatches, probs: np.ndarray, seed: int) -> np.ndarray:
    """Boolean keep mask of a shard's samples: one uniform draw per (sample, matched entry); kept when any
    draw is below its entry's probability."""
    import numpy as np

    draws = shard_generator(seed, shard.url).random(len(shard.ids))
    hit = draws < probs[shard.ids]
    sample_of = np.repeat(np.arange(len(shard.keys)), np.diff(shard.offsets))
    keep = np.zeros(len(shard.keys), bool)
    keep[sample_of[hit]] = True
    return keep


@dataclass
class CurationResult:
    """What :func:`curate` did: sample counts, per-entry counts before/after, and the files written."""

    samples: int
    matched: int
    kept: int
    counts: np.ndarray
    curated_counts: np.ndarray
    shards: list[Path]
    counts_file: Path
    plot_file: Path | None
    kept_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"curated {self.kept} of {self.samples} samples ({self.matched} matched an entry) into "
                f"{len(self.shards)} shard(s); counts: {self.counts_file}"
                + (f"; plot: {self.plot_file}" if self.plot_file else ""))


def caption_extensions() -> tuple[str, ...]:
    """The extensions of every natural-language data side (where captions live), from the modality registry."""
    from mmpt.registry import modalities

    exts = [e for name in modalities.names() if getattr(modalities.get(name), "natural_language", False)
            for e in modalities.get(name).extensions]
    return tuple(dict.fromkeys(exts))


def match_shards(urls: Sequence[str], entries: Sequence[str], caption_exts: Sequence[str],
                 workers: int = 1) -> list[ShardMatches]:
    """Pass 1 over every shard, in ``workers`` processes (1: in this process); results in ``urls`` order."""
    if workers <= 1 or len(urls) <= 1:
        _init_worker(entries, caption_exts)
        return [_match_shard(u) for u in urls]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the caller may hold threads (torch, a loader) that a forked child would inherit locked
    with ProcessPoolExecutor(min(workers, len(urls)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(list(entries), list(caption_exts))) as pool:
        return list(pool.map(_match_shard, urls))


def curate(shards: str, metadata: str | Path | Sequence[str], t: int, out: str, *, seed: int = 0, workers: int = 1,
           caption_exts: Sequence[str] | None = None, max_count: int = 10000, max_size: int = 256 << 20,
           plot: bool = True) -> CurationResult:
    """Curate ``shards`` against ``metadata`` (a file of entries or a list) with threshold ``t``; write the kept
    samples to the shard pattern ``out`` plus ``curation.json`` and ``curation.png`` in its folder."""
    import numpy as np

    from mmpt.data.writer import ShardWriter

    if t < 1:
        raise ConfigError(f"--t: expected a positive integer (MetaCLIP's per-entry cap), got {t}")
    ShardWriter.check_pattern(out)
    entries = list(metadata) if not isinstance(metadata, (str, Path)) else read_entries(metadata)
    exts = tuple(caption_exts) if caption_exts else caption_extensions()
    urls = expand_urls(shards)
    found = match_shards(urls, entries, exts, workers)
    counts = np.zeros(len(entries), np.int64)
    for shard in found:
        np.add.at(counts, shard.ids, 1)
    samples = sum(len(s.keys) for s in found)
    if samples == 0:
        raise DataError(f"{shards}: no samples read ({sum(len(s.problems) for s in found)} shard problems)")
    probs = entry_probabilities(counts, t)
    keeps = [balance(s, probs, seed) for s in found]
    curated = np.zeros(len(entries), np.int64)
    for s, keep in zip(found, keeps, strict=True):
        chosen = np.repeat(keep, np.diff(s.offsets))
        np.add.at(curated, s.ids[chosen], 1)
    folder = Path(out).parent
    kept_keys: list[str] = []
    with ShardWriter(out, max_size=max_size, max_count=max_count) as writer:
        for s, keep in zip(found, keeps, strict=True):
            wanted = {k for k, kept in zip(s.keys, keep, strict=True) if kept}
            if not wanted:
                continue
            for sample in iter_samples(s.url):
                if isinstance(sample, ShardEvent) or sample.get("__cut__") or sample["__key__"] not in wanted:
                    continue
                writer.write(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
                kept_keys.append(sample["__key__"])
    matched = sum(int((np.diff(s.offsets) > 0).sum()) for s in found)
    counts_file = folder / "curation.json"
    counts_file.write_text(json.dumps({
        "shards": urls, "metadata": str(metadata) if isinstance(metadata, (str, Path)) else None, "t": t, "seed": seed,
        "samples": samples, "matched": matched, "kept": len(kept_keys),
        "no_caption": sum(s.no_caption for s in found), "caption_extensions": list(exts),
        "shard_problems": {s.url: s.problems for s in found if s.problems},
        "output_shards": [str(p) for p in writer.shards],
        "counts": dict(zip(entries, counts.tolist(), strict=True)),
        "curated_counts": dict(zip(entries, curated.tolist(), strict=True))}, indent=1) + "\n")
    png = plot_counts(counts, curated, t, folder / "curation.png") if plot else None
    return CurationResult(samples, matched, len(kept_keys), counts, curated, writer.shards, counts_file, png, kept_keys)


def plot_counts(before: np.ndarray, after: np.ndarray, t: int, out: Path) -> Path:
    """Entry counts sorted by rank, before and after balancing, on a log scale, with the threshold ``t``."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, counts in (("pool", before), ("curated", after)):
        ranked = np.sort(counts[counts > 0])[::-1]
        ax.plot(np.arange(1, len(ranked) + 1), ranked, marker=".", label=f"{label} ({int(counts.sum())} matches)")
    ax.axhline(t, color="gray", linestyle="--", linewidth=1, label=f"t = {t}")
    ax.set_yscale("log")
    ax.set_xlabel("metadata entry (by count)")
    ax.set_ylabel("samples matching")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt data curate SHARDS --metadata ENTRIES --t N --out PATTERN``."""
    c = sub.add_parser("curate", help="MetaCLIP curation: match captions to metadata entries, balance, write shards",
                       description=__doc__.split("\n\n")[0])
    c.add_argument("shards", help="local shards: path, glob or brace list")
    c.add_argument("--metadata", required=True, help="entries: a text file (one a line) or a JSON list of strings")
    c.add_argument("--t", type=int, required=True, help="per-entry cap: entries matched more often are sampled "
                   "down with probability t/count (MetaCLIP: 20000 for 400M pairs)")
    c.add_argument("--out", required=True, help="output shard pattern, e.g. curated/train-%%06d.tar; curation.json and "
                   "curation.png go next to it")
    c.add_argument("--seed", type=int, default=0, help="balancing seed (same seed, same subset)")
    c.add_argument("--workers", type=int, default=1, help="processes matching shards in parallel")
    c.add_argument("--caption-ext", action="append", default=[], metavar="EXT",
                   help="member holding the caption (default: the natural-language modalities' extensions)")
    c.add_argument("--max-count", type=int, default=10000, help="samples per output shard at most")
    c.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print(curate(args.shards, args.metadata, args.t, args.out, seed=args.seed, workers=args.workers,
                 caption_exts=args.caption_ext or None, max_count=args.max_count))
    return 0
