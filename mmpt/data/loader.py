"""From shards to Batches: per-worker deterministic sample streams, decode, collate, resume.

Each (rank, DataLoader worker) pair is a *logical worker* whose sample stream is a pure function of
(seed, logical worker id, sources). Stages inside a worker, in order::

    shard order (seeded) -> tar members grouped by key -> shuffle buffer (seeded) -> [resume skip]
    -> decode + transform (per sample, reseeded by sample index) -> collate a batch (batch ops)

Resume skips the first N raw samples of each logical worker *before* decoding, so a resumed run
sees the same samples in the same order as an uninterrupted one. Sample skips are counted when a
sample is consumed (after the shuffle buffer), so counts match the resume position; shard events
(unreadable, truncated) are recorded once per shard, as a set of URLs, however often the stream reads
the shard ahead. A training stream that yields nothing usable (a run of ``max_consecutive_skips``
skipped samples, or two passes' worth when shards are small) stops with a DataError naming the
shards and reasons; from a DataLoader worker it reaches the main process as that one error. Training streams never end (shards
repeat, reshuffled each pass), so every rank runs the same number of steps however uneven the
shards are; eval/embedding streams are finite.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpt.contracts import Batch, ModalityData
from mmpt.data.budget import decode_within_budget, skip_reason
from mmpt.data.shards import (
    CUT_REASON,
    SHARD_REASONS,
    DataError,
    ShardEvent,
    assign,
    expand_urls,
    iter_samples,
)


@dataclass
class LoaderState:
    """Where a rank's loader stands, per logical worker: raw samples consumed, skipped samples by reason,
    and the shards with a problem by reason."""

    batches: int = 0
    consumed: list[int] = field(default_factory=list)
    skips: list[dict[str, int]] = field(default_factory=list)
    shards: list[dict[str, list[str]]] = field(default_factory=list)

    def total_skips(self) -> dict[str, int]:
        """Skipped-sample counts summed over logical workers (shard events are in :meth:`shard_events`)."""
        out: Counter[str] = Counter()
        for s in self.skips:
            out.update({k: v for k, v in s.items() if k not in SHARD_REASONS})  # older states mixed them in
        return dict(out)

    def shard_events(self) -> dict[str, list[str]]:
        """Shards with a problem (reason -> sorted distinct URLs) over logical workers."""
        return merge_shard_events(self.shards)

    def counts(self) -> dict[str, int]:
        """Skipped samples per reason and distinct shards per shard-event reason, as summaries show them."""
        return skip_counts([self.total_skips()], [self.shard_events()])


def merge_shard_events(parts: Iterable[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Union of several ``reason -> URLs`` maps (workers, ranks), each URL once."""
    out: dict[str, set[str]] = {}
    for part in parts:
        for reason, urls in part.items():
            out.setdefault(reason, set()).update(urls)
    return {reason: sorted(urls) for reason, urls in sorted(out.items())}


def skip_counts(skips: Iterable[dict[str, int]], shards: Iterable[dict[str, list[str]]]) -> dict[str, int]:
    """One flat count map for logs and summaries: samples per skip reason (summed) and, per shard-event
    reason, the number of distinct shards."""
    total: Counter[str] = Counter()
    for s in skips:
        total.update(s)
    return {**dict(total), **{r: len(u) for r, u in merge_shard_events(shards).items()}}


def format_skips(counts: dict[str, int]) -> str:
    """``skipped 16 samples (decode_error_image=16); 1 truncated shard`` from :func:`skip_counts`."""
    samples = {k: v for k, v in sorted(counts.items()) if k not in SHARD_REASONS and v}
    text = f"skipped {sum(samples.values())} samples"
    if samples:
        text += f" ({', '.join(f'{k}={v}' for k, v in samples.items())})"
    events = [f"{n} {r.replace('_', ' ')}{'s' if n != 1 else ''}" for r, n in sorted(counts.items())
              if r in SHARD_REASONS and n]
    return text + (f"; {', '.join(events)}" if events else "")


@dataclass
class StreamSpec:
    """Everything a logical worker needs to produce its stream (picklable for worker processes)."""

    sources: list[tuple[list[str], float]]
    modalities: dict[str, ModalityData]
    batch_size: int
    train: bool
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 1
    resampled: bool = False
    shuffle_buffer: int = 0
    required: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    split_by_rank: bool = True
    repeat: bool = True
    drop_last: bool = True
    by_shard: bool = False
    max_consecutive_skips: int = 10_000


@dataclass
class _StreamFailure:
    """Sent from a DataLoader worker in place of a batch, so the main process raises the worker's DataError
    as that one error rather than torch's wrapped worker traceback."""

    message: str


class WorkerStream:
    """The stream of one logical worker."""

    def __init__(self, spec: StreamSpec, logical: int, skip: int = 0, skips: dict[str, int] | None = None,
                 shards: dict[str, list[str]] | None = None):
        self.spec = spec
        self.logical = logical
        w = max(spec.workers, 1)
        self.gw = spec.rank * w + logical if spec.split_by_rank else logical
        self.gworkers = spec.world * w if spec.split_by_rank else w
        self.skip_target = skip
        self.consumed = 0
        self.skips: dict[str, int] = dict(skips or {})
        self.shards: dict[str, list[str]] = {r: list(u) for r, u in (shards or {}).items()}
        self.rng = random.Random(f"{spec.seed}-{self.gw}-stream")
        self.run_reasons: Counter[str] = Counter()  # the current run of consecutive skipped samples
        self.run_urls: Counter[str] = Counter()
        self.pass_sizes: dict[int, int] = {}  # raw samples of one full pass, per source

    def _note_event(self, event: ShardEvent) -> None:
        urls = self.shards.setdefault(event.reason, [])
        if event.url not in urls:
            urls.append(event.url)

    def _count(self, reason: str) -> None:
        if self.consumed >= self.skip_target:  # during a resume replay these were counted already
            self.skips[reason] = self.skips.get(reason, 0) + 1

    def _source(self, urls: list[str], index: int = 0) -> Iterator[dict | ShardEvent]:
        mine, stride, offset = assign(urls, self.gw, self.gworkers)
        empty_passes: set[str] = set()  # shards read in consecutive passes that gave this worker nothing
        while True:
            if self.spec.resampled:
                order = [self.rng.choice(urls) for _ in range(max(len(mine), 1))]
                stride = 1
            else:
                order = list(mine)
                if self.spec.train:
                    self.rng.shuffle(order)
            produced, idx, events = 0, 0, Counter()
            for url in order:
                for s in iter_samples(url):
                    if isinstance(s, ShardEvent):
                        events[s.reason] += 1
                        yield s
                        continue
                    idx += 1
                    if stride == 1 or (idx - 1) % stride == offset:
                        produced += 1
                        yield s
            if not self.spec.repeat:
                return
            self.pass_sizes[index] = produced
            empty_passes = empty_passes | set(order) if produced == 0 else set()
            if empty_passes >= set(urls if self.spec.resampled else mine):  # nothing to repeat: stop, not spin
                raise DataError(self._nothing_readable(sorted(empty_passes), idx, events))

    def _nothing_readable(self, urls: list[str], idx: int, events: Counter[str]) -> str:
        where = f"data worker {self.gw} of {self.gworkers}"
        if idx:
            return (f"data: {where} gets no sample of the {idx} in shard(s) {_names(urls)}: "
                    f"fewer samples than data workers; lower data.workers")
        return (f"data: no readable sample in shard(s) {_names(urls)} of {where} "
                f"({_reasons(events)}); check them with `mmpt data inspect`")

    def _skipped(self, reason: str, url: str) -> None:
        """Count a sample in the current run of skips; stop when the run shows nothing usable is coming."""
        self.run_reasons[reason] += 1
        self.run_urls[url] += 1
        run, limit = sum(self.run_reasons.values()), self.spec.max_consecutive_skips
        if not self.spec.repeat:
            return  # a finite stream ends by itself; its counts are reported
        full_pass = len(self.pass_sizes) == len(self.spec.sources) and run >= 2 * sum(self.pass_sizes.values()) \
            + max(self.spec.shuffle_buffer, 0)
        if run >= limit or full_pass:
            why = f"data.max_consecutive_skips={limit} reached" if run >= limit else \
                "two passes over this data worker's shards gave nothing usable"
            events = {r: len(u) for r, u in self.shards.items()}
            raise DataError(
                f"data: {run} samples in a row skipped in shard(s) {_names(list(self.run_urls))} "
                f"({_reasons(self.run_reasons)}){'; shard problems: ' + _reasons(events) if events else ''}; "
                f"{why}: check the shards with `mmpt data inspect --decode`, or raise data.max_consecutive_skips")

    def _mixed(self) -> Iterator[dict | ShardEvent]:
        streams = [self._source(urls, i) for i, (urls, _) in enumerate(self.spec.sources)]
        if not streams:
            return
        if len(streams) == 1:
            yield from streams[0]
            return
        weights = [w for _, w in self.spec.sources]
        alive = list(range(len(streams)))
        while alive:
            i = self.rng.choices(alive, weights=[weights[j] for j in alive])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                alive.remove(i)

    def _shuffled(self) -> Iterator[dict | ShardEvent]:
        size = self.spec.shuffle_buffer if self.spec.train else 0
        if size <= 1:
            yield from self._mixed()
            return
        buf: list[dict] = []
        for s in self._mixed():
            if isinstance(s, ShardEvent):
                yield s
                continue
            if len(buf) < size:
                buf.append(s)
                if len(buf) < size:
                    continue
            i = self.rng.randrange(len(buf))
            out, buf[i] = buf[i], s
            yield out
        self.rng.shuffle(buf)
        yield from buf

    def decode(self, raw: dict) -> dict | str:
        """Decode + transform one raw sample; returns the sample or the reason it was skipped."""
        if raw.get("__cut__"):
            return CUT_REASON
        random.seed(f"{self.spec.seed}-{self.gw}-{self.consumed}")  # per-sample: resume-exact augmentation
        sample: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw["__url__"]}
        for modality, spec in self.spec.modalities.items():
            ext = next((e for e in spec.extensions if e in raw), None)
            required = modality in self.spec.required
            if ext is None:
                if required:
                    return f"missing_{modality}"
                sample[modality] = None
                continue
            if not raw[ext]:
                return f"empty_{ext}"
            try:
                sample[modality] = spec.transform(decode_within_budget(spec, raw[ext], ext), self.spec.train)
            except Exception as exc:  # any decoder failure is a bad sample, not a crashed run
                if required:
                    return skip_reason(exc, modality)
                self._count(skip_reason(exc, modality))
                sample[modality] = None
        for ext in self.spec.keep:
            if ext in raw:
                sample[f"__{ext}__"] = _decode_extra(raw[ext], ext)
        return sample

    def samples(self) -> Iterator[dict]:
        """Decoded samples after the resume skip; skipped samples are counted by reason."""
        for raw in self._shuffled():
            if isinstance(raw, ShardEvent):
                self._note_event(raw)
                continue
            if self.consumed < self.skip_target:
                self.consumed += 1
                continue
            out = self.decode(raw)
            self.consumed += 1
            if isinstance(out, str):
                self._count(out)
                self._skipped(out, raw["__url__"])
                continue
            self.run_reasons.clear()
            self.run_urls.clear()
            yield out

    def batches(self) -> Iterator[Batch]:
        """Collated batches; in by_shard mode a batch never spans two shards and the batch ending a
        shard lists it in ``meta['_loader']['shards_done']`` (possibly with no samples)."""
        pending: list[dict] = []
        url = None
        for s in self.samples():
            if self.spec.by_shard and url is not None and s["__url__"] != url:
                yield self.collate(pending, shards_done=[url])
                pending = []
            url = s["__url__"]
            pending.append(s)
            if len(pending) == self.spec.batch_size:
                yield self.collate(pending)
                pending = []
        if self.spec.by_shard and url is not None:
            yield self.collate(pending, shards_done=[url])
        elif pending and not self.spec.drop_last:
            yield self.collate(pending)

    def collate(self, samples: list[dict], shards_done: list[str] | None = None) -> Batch:
        """Per-modality batch collation plus presence masks and loader bookkeeping."""
        fields, present = {}, {}
        if samples:
            for modality, spec in self.spec.modalities.items():
                values = [s.get(modality) for s in samples]
                present[modality] = torch.tensor([v is not None for v in values], dtype=torch.bool)
                fields[modality] = spec.collate(values)
        meta: dict[str, Any] = {
            "url": [s["__url__"] for s in samples],
            "_loader": {"worker": self.logical, "consumed": self.consumed, "skips": dict(self.skips),
                        "shards": {r: list(u) for r, u in self.shards.items()}, "shards_done": shards_done or []},
        }
        for ext in self.spec.keep:
            meta[ext] = [s.get(f"__{ext}__") for s in samples]
        return Batch(fields=fields, present=present, keys=[s["__key__"] for s in samples], meta=meta)


def drops_whole_sample(reason: str) -> bool:
    """Whether a skip reason drops the whole sample (a cut, an empty member, a missing required modality)
    rather than one modality's value, which an optional modality turns into an absent row."""
    return reason == CUT_REASON or reason.startswith(("empty_", "missing_"))


def _names(urls: list[str], most: int = 3) -> str:
    more = f" and {len(urls) - most} more" if len(urls) > most else ""
    return ", ".join(urls[:most]) + more


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _decode_extra(data: bytes, ext: str) -> Any:
    if ext == "json":
        try:
            return json.loads(data)
        except ValueError:
            return None
    return data.decode("utf-8", errors="replace")


class ShardDataset(IterableDataset):
    """IterableDataset mapping physical DataLoader workers to logical workers (rotated on resume)."""

    def __init__(self, spec: StreamSpec, state: LoaderState | None = None):
        self.spec = spec
        w = max(spec.workers, 1)
        self.state = state or LoaderState(0, [0] * w, [{} for _ in range(w)], [{} for _ in range(w)])
        if len(self.state.shards) != w:  # a state saved before shard events were kept apart
            self.state.shards = [{} for _ in range(w)]
        if len(self.state.consumed) != w:
            raise DataError(f"resume state has {len(self.state.consumed)} data workers per rank, this run {w}: "
                            f"resume with data.workers={len(self.state.consumed)}")

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        w = max(self.spec.workers, 1)
        phys = info.id if info is not None else 0
        # DataLoader takes batches from physical workers round robin starting at 0; the next batch of
        # the interrupted run belonged to logical worker (batches % w).
        logical = (phys + self.state.batches) % w
        stream = WorkerStream(self.spec, logical, self.state.consumed[logical], self.state.skips[logical],
                              self.state.shards[logical])
        if info is None and w > 1:
            raise DataError("ShardDataset with workers > 1 must run inside a DataLoader with as many workers")
        if info is None:
            yield from stream.batches()
            return
        try:
            yield from stream.batches()
        except DataError as exc:
            yield _StreamFailure(str(exc))


class Loader:
    """Iterable of Batches for one rank, tracking a resumable :class:`LoaderState`."""

    def __init__(self, spec: StreamSpec, state: LoaderState | None = None, pin_memory: bool = False,
                 prefetch: int = 2):
        self.spec = spec
        self.dataset = ShardDataset(spec, state)
        st = self.dataset.state
        self.state = LoaderState(st.batches, list(st.consumed), [dict(s) for s in st.skips],
                                 [{r: list(u) for r, u in s.items()} for s in st.shards])
        self.pin_memory = pin_memory
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[Batch]:
        workers = self.spec.workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch if workers > 0 else None,
                            persistent_workers=False, multiprocessing_context="fork" if workers > 0 else None,
                            # Its own generator: the default draws the workers' base seed from the global RNG at
                            # the first batch, which after a resume comes after the restored RNG state, so a
                            # forward that draws random numbers (dropout, SpecAugment) would not resume exactly.
                            generator=torch.Generator())
        for batch in loader:
            if isinstance(batch, _StreamFailure):
                raise DataError(batch.message)
            info = batch.meta["_loader"]
            self.state.consumed[info["worker"]] = info["consumed"]
            self.state.skips[info["worker"]] = info["skips"]
            self.state.shards[info["worker"]] = info["shards"]
            self.state.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable loader position."""
        return {"batches": self.state.batches, "consumed": self.state.consumed, "skips": self.state.skips,
                "shards": self.state.shards}

    @staticmethod
    def state_from_dict(d: dict[str, Any]) -> LoaderState:
        """The inverse of :meth:`state_dict` (states saved before ``shards`` existed load too)."""
        shards = [{r: list(u) for r, u in s.items()} for s in d.get("shards", [])]
        return LoaderState(int(d["batches"]), [int(c) for c in d["consumed"]], [dict(s) for s in d["skips"]], shards)


def resolve_sources(sources: list[Any]) -> list[tuple[list[str], float]]:
    """Expand each source pattern (a string or an object with url/weight) to its shard list."""
    out = []
    for s in sources:
        url, weight = (s, 1.0) if isinstance(s, str) else (s.url, s.weight)
        out.append((expand_urls(url), float(weight)))
    if not out:
        raise DataError("data.sources: no training shards given (set data.sources or --set data.sources=PATTERN)")
    return out


def eval_loader(pattern: str | list[str], modalities: dict[str, ModalityData], batch_size: int, *,
                keep: tuple[str, ...] = (), workers: int = 1, rank: int = 0, world: int = 1,
                split_by_rank: bool = False, by_shard: bool = False) -> Loader:
    """A finite, unshuffled loader (eval and embedding export). Keeps every sample (no drop_last)."""
    urls = expand_urls(pattern) if isinstance(pattern, str) else list(pattern)
    if split_by_rank:
        urls = urls[rank::world]
    n_workers = min(workers, len(urls))
    spec = StreamSpec(sources=[(urls, 1.0)], modalities=modalities, batch_size=batch_size, train=False,
                      workers=n_workers, keep=keep, split_by_rank=False, repeat=False, drop_last=False,
                      by_shard=by_shard)
    if not urls:
        spec.sources = []
    return Loader(spec)


def train_loader(cfg: Any, modalities: dict[str, ModalityData], rank: int, world: int,
                 state: LoaderState | None = None) -> tuple[Loader, int]:
    """The training loader of one rank and the epoch length in samples (``data.samples_per_epoch``
    or the count of local shard members). Fails before training on impossible settings."""
    from mmpt.data.shards import count_samples

    d = cfg.data
    sources = resolve_sources(d.sources)
    per_epoch = d.samples_per_epoch or count_samples([u for urls, _ in sources for u in urls])
    if d.max_consecutive_skips < 1:
        raise DataError(f"data.max_consecutive_skips: must be >= 1, got {d.max_consecutive_skips}")
    global_batch = d.batch_size * world * cfg.train.grad_accum
    if per_epoch < global_batch:
        raise DataError(f"data.batch_size: {d.batch_size} x {world} ranks x {cfg.train.grad_accum} accumulation "
                        f"= {global_batch} samples per step, but an epoch has only {per_epoch} samples")
    spec = StreamSpec(sources=sources, modalities=modalities, batch_size=d.batch_size, train=True, seed=cfg.seed,
                      rank=rank, world=world, workers=d.workers, resampled=d.resampled,
                      shuffle_buffer=d.shuffle_buffer, required=tuple(d.required), repeat=True,
                      max_consecutive_skips=d.max_consecutive_skips)
    return Loader(spec, state, pin_memory=torch.cuda.is_available(), prefetch=d.prefetch), per_epoch
