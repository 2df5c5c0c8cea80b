"""What every eval task shares: the Task base, embedding a dataset or a list of texts, labels and top-k.

Tasks never loop over batches themselves: :func:`embed_data` turns shards (or a class-folder
directory) of any modality into one embedding matrix plus per-sample metadata, :func:`embed_tokens`
into per-token features, and :func:`embed_texts` embeds strings, so a task is only its scoring.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from mmpt.contracts import Batch, EncoderOutput, ModalityData
from mmpt.data.loader import drops_whole_sample, eval_loader
from mmpt.data.shards import DataError, expand_urls
from mmpt.eval.sharding import all_gather, canonical_order, current_ranks, in_lockstep
from mmpt.model import MultimodalModel
from mmpt.nn.layers import layer_exit
from mmpt.nn.matryoshka import prefix
from mmpt.registry import ConfigError


@dataclass(kw_only=True)
class Task:
    """Base of every eval task: the dataclass fields are the recipe keys, validated by the registry.

    data: shard pattern (path, glob, brace list, ``pipe:``) or, where a task says so, a directory of
    class subfolders of files of the task's modality. batch_size: samples per forward. workers: data loading processes.

    dim: score with the first ``dim`` dims of every embedding, L2-normalised again (a Matryoshka size; null: all).
    layer: stop every tower after its first ``layer`` transformer blocks, its final norm, pooling and head applied
    there (a Starbucks sub-model; null: all). Both apply to every tower the task runs; ``mmpt eval --set dim=64``
    sets them on every task.
    """

    data: str
    batch_size: int = 256
    workers: int = 1
    dim: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        for key in ("dim", "layer"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key}: expected a positive integer or null, got {value!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        check_source(self.data, "data")

    def default_id(self) -> str:
        """Result name used when the task dict sets no ``id``."""
        return str(getattr(type(self), "registry_name", type(self).__name__))

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:  # pragma: no cover - abstract
        """Evaluate ``model``; returns a flat dict of metrics (numbers, plus maybe a small table)."""
        raise NotImplementedError


def is_class_folder(path: str) -> bool:
    """True for a directory holding no shards (``.tar``): read as ``class_name/<file>`` files."""
    return os.path.isdir(path) and not glob.glob(os.path.join(path, "*.tar"))


def check_source(pattern: str, key: str) -> None:
    """Fail at build time, naming ``key``, when ``pattern`` matches no shards and is no class folder."""
    if is_class_folder(pattern):
        return
    try:
        expand_urls(pattern)
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def require_modality(specs: dict[str, ModalityData], modality: str, why: str) -> ModalityData:
    """The data side of ``modality``, or a ConfigError saying which towers the model has."""
    if modality not in specs:
        raise ConfigError(f"{why} needs a '{modality}' tower; the model has {', '.join(specs) or 'none'}")
    return specs[modality]


@dataclass
class Embedded:
    """Embeddings of a dataset with per-sample metadata, in canonical order: shard by shard as the pattern
    lists them, each in stream order (file order for class folders), at any world size and worker count.

    embeddings: (N, E) L2-normalised, on the eval device. keys: sample keys (file paths for image
    folders). meta: per-sample extras: the ``keep`` extensions of shards (decoded ``json`` dicts,
    ``txt`` strings; None where absent) or ``label`` (folder name) for image folders. skipped:
    samples without a decodable input, which have no row.
    """

    embeddings: Tensor
    keys: list[str]
    meta: dict[str, list[Any]] = field(default_factory=dict)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Rows:
    """What one rank embedded of a dataset: each row's place in the whole set, key and meta, and skips."""

    order: list[tuple[int, int, int]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    meta: dict[str, list[Any]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    absent: int = 0  # rows of embedded batches that lack the modality
    dropped: int = 0  # samples the loader dropped whole (in no batch)
    shared_reads: bool = False  # every rank read every sample (batch split): ``dropped`` counts once

    def add(self, batch: Batch, rows: list[int], order: list[tuple[int, int, int]]) -> None:
        """Record the present ``rows`` of an embedded batch."""
        self.order += [order[i] for i in rows]
        self.keys += [batch.keys[i] for i in rows]
        for ext in self.extras:
            values = batch.meta.get(ext, [None] * len(batch))
            self.meta.setdefault(ext, []).extend(values[i] for i in rows)
        self.absent += len(batch) - len(rows)

    def assemble(self, values: Tensor | list[Tensor], device: torch.device | str
                 ) -> tuple[Any, list[str], dict[str, list[Any]], int]:
        """(values, keys, meta, skipped) of every rank's rows in canonical order (shard, then stream order;
        file order for class folders): the same at any world size and worker count."""
        ranks = current_ranks()
        if ranks.world > 1:  # travel through the CPU; come back on the eval device
            values = values.cpu() if isinstance(values, Tensor) else [v.cpu() for v in values]
        parts = all_gather((self, values), ranks)
        perm = canonical_order([o for rows, _ in parts for o in rows.order])
        if isinstance(values, Tensor):
            gathered = torch.cat([v for _, v in parts]).to(device)
            values = gathered[torch.tensor(perm, dtype=torch.long, device=gathered.device)]
        else:
            flat = [v for _, vs in parts for v in vs]
            values = [flat[i].to(device) for i in perm]
        keys = [k for rows, _ in parts for k in rows.keys]
        meta = {ext: [m for rows, _ in parts for m in rows.meta.get(ext, [])] for ext in self.extras
                if any(ext in rows.meta for rows, _ in parts)}
        dropped = [rows.dropped for rows, _ in parts]
        skipped = sum(rows.absent for rows, _ in parts) + (dropped[0] if self.shared_reads else sum(dropped))
        return values, [keys[i] for i in perm], {ext: [v[i] for i in perm] for ext, v in meta.items()}, skipped


# (dim, layer) every embedding of this module is cut to within :func:`nested_size` (None: whole).
_NESTED: ContextVar[tuple[int | None, int | None]] = ContextVar("mmpt_eval_nested", default=(None, None))


@contextmanager
def nested_size(dim: int | None = None, layer: int | None = None) -> Iterator[None]:
    """Within the block, every embedding of :mod:`mmpt.eval.common` comes from towers stopped after their first
    ``layer`` blocks and keeps its first ``dim`` dims, L2-normalised again (Matryoshka / Starbucks sizes)."""
    token = _NESTED.set((dim, layer))
    try:
        yield
    finally:
        _NESTED.reset(token)


def embedding_width(model: MultimodalModel) -> int:
    """The width of the embeddings this module returns now (the nested ``dim`` when set)."""
    return _NESTED.get()[0] or model.embed_dim


def _forward(model: MultimodalModel, modality: str, fields: dict[str, Tensor], device: torch.device | str) -> EncoderOutput:
    dim, layer = _NESTED.get()
    fields = {k: v.to(device, non_blocking=True) for k, v in fields.items()}
    if dim is None and layer is None:
        return model.encode_fields(modality, fields)
    if dim is not None and dim > model.embed_dim:
        raise ConfigError(f"dim={dim}: larger than the model's embedding size {model.embed_dim}")
    with layer_exit(model.encoders[modality], layer):
        out = model.encode_fields(modality, fields)
    out.embedding = prefix(out.embedding, dim)
    return out


Placed = tuple[Batch, list[tuple[int, int, int]]]  # a batch and each row's place in the whole set


def rank_batches(spec: ModalityData, pattern: str, batch_size: int, keep: tuple[str, ...], workers: int,
                 modality: str, rows: _Rows) -> Iterator[tuple[Placed, bool]]:
    """((batch, each row's place in the whole set), whether this rank embeds it) for the batches of
    ``pattern`` this rank reads: its shards when there are at least as many shards as ranks (no rank
    decodes another's samples), else every batch, of which it embeds every ``world``-th; its files of a
    class folder."""
    ranks = current_ranks()
    if is_class_folder(pattern):
        files = class_folder_files(pattern, spec.extensions)
        place = {path: i for i, (path, _) in enumerate(files)}
        rows.extras = ("label",)
        for batch in class_folder_batches(spec, pattern, batch_size, workers, modality,
                                          files=files[ranks.rank::ranks.world]):
            yield (batch, [(place[k], 0, 0) for k in batch.keys]), True
        return
    urls = expand_urls(pattern)
    by_shard = len(urls) >= ranks.world
    place = {url: i for i, url in enumerate(urls)}
    rows.extras, rows.shared_reads = keep, not by_shard
    loader = eval_loader(urls[ranks.rank::ranks.world] if by_shard else urls, {modality: spec}, batch_size,
                         keep=keep, workers=workers)
    for j, batch in enumerate(loader):
        if len(batch):
            yield (batch, [(place[url], j, i) for i, url in enumerate(batch.meta["url"])]), by_shard or ranks.owns(j)
    # An undecodable input reaches the batch as an absent row (counted in _Rows.add) and in the loader's
    # counts; samples the loader dropped whole (empty members) are only in its counts.
    rows.dropped += sum(n for reason, n in loader.state.total_skips().items() if drops_whole_sample(reason))


def encoded_batches(model: MultimodalModel, specs: dict[str, ModalityData], pattern: str, batch_size: int,
                    keep: tuple[str, ...], device: torch.device | str, progress: bool, workers: int, modality: str,
                    desc: str, rows: _Rows) -> Iterator[tuple[EncoderOutput, list[int], Batch, list[tuple[int, int, int]]]]:
    """(tower output, rows of present samples, batch, each row's place) per batch this rank embeds of
    ``pattern`` (shards or a class folder) through the ``modality`` tower (see :mod:`mmpt.eval.sharding`)."""
    spec = require_modality(specs, modality, f"embedding '{pattern}'")

    def one_sample(placed: Placed) -> dict[str, Tensor]:  # padding forwards cost a gather, not a batch
        return {k: v[:1] for k, v in placed[0].fields[modality].items()}

    batches = tqdm(rank_batches(spec, pattern, batch_size, keep, workers, modality, rows), disable=not progress,
                   desc=desc, unit="batch", leave=False)
    for batch, order in in_lockstep(batches, one_sample, lambda fields: _forward(model, modality, fields, device),
                                    current_ranks()):
        # The whole batch goes through the tower (absent rows are zero-filled by collate) so every rank
        # runs the same forwards; absent rows are dropped afterwards.
        out = _forward(model, modality, batch.fields[modality], device)
        yield out, batch.present[modality].nonzero().squeeze(1).tolist(), batch, order


@torch.no_grad()
def embed_data(model: MultimodalModel, specs: dict[str, ModalityData], pattern: str, batch_size: int,
               keep: tuple[str, ...] = ("json", "txt"), device: torch.device | str = "cpu",
               progress: bool = True, *, workers: int = 1, modality: str = "image",
               desc: str = "embed") -> Embedded:
    """Embed every sample of ``pattern`` (shards, or a class folder) with the ``modality`` tower; within
    :func:`~mmpt.eval.sharding.split_over_ranks` each rank embeds its part and every rank gets the whole."""
    rows, chunks = _Rows(), []
    for out, present, batch, order in encoded_batches(model, specs, pattern, batch_size, keep, device, progress,
                                                      workers, modality, desc, rows):
        chunks.append(out.embedding[present])
        rows.add(batch, present, order)
    local = torch.cat(chunks).float() if chunks else torch.zeros(0, embedding_width(model), device=device)
    embeddings, keys, meta, skipped = rows.assemble(local, device)
    return Embedded(embeddings, keys, meta, skipped=skipped)


@dataclass
class TokenFeatures:
    """Per-token features of a dataset, in canonical order (as :class:`Embedded`).

    features: one (T_i, D) tensor per sample: the real tokens (mask True) of ``EncoderOutput.tokens``,
    leading non-content tokens included. keys / meta / skipped: as in :class:`Embedded`.
    """

    features: list[Tensor]
    keys: list[str]
    meta: dict[str, list[Any]] = field(default_factory=dict)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.keys)


@torch.no_grad()
def embed_tokens(model: MultimodalModel, specs: dict[str, ModalityData], pattern: str, batch_size: int,
                 keep: tuple[str, ...] = ("json",), device: torch.device | str = "cpu", progress: bool = True, *,
                 workers: int = 1, modality: str = "text", desc: str = "tokens") -> TokenFeatures:
    """Frozen per-token features (``EncoderOutput.tokens`` where its mask is True) of every sample."""
    rows, features = _Rows(), []
    for out, present, batch, order in encoded_batches(model, specs, pattern, batch_size, keep, device, progress,
                                                      workers, modality, desc, rows):
        tokens = out.tokens.float()
        mask = out.mask if out.mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                 device=tokens.device)
        features += [tokens[i][mask[i]] for i in present]
        rows.add(batch, present, order)
    features, keys, meta, skipped = rows.assemble(features, device)
    return TokenFeatures(features, keys, meta, skipped=skipped)


@torch.no_grad()
def embed_texts(model: MultimodalModel, specs: dict[str, ModalityData], texts: list[str], batch_size: int,
                device: torch.device | str = "cpu", *, modality: str = "text") -> Tensor:
    """(len(texts), E) L2-normalised embeddings of strings, ``batch_size`` at a time (every ``world``-th
    batch on each rank within :func:`~mmpt.eval.sharding.split_over_ranks`; every rank passes the same list)."""
    spec = require_modality(specs, modality, "embedding texts")
    ranks = current_ranks()
    starts = ((start, ranks.owns(j)) for j, start in enumerate(range(0, len(texts), batch_size)))
    mine: dict[int, Tensor] = {}
    for start in in_lockstep(starts, lambda start: spec.prepare(texts[start:start + 1], train=False),
                             lambda fields: _forward(model, modality, fields, device), ranks):
        fields = spec.prepare(texts[start:start + batch_size], train=False)
        mine[start] = _forward(model, modality, fields, device).embedding.float()
    if ranks.world > 1:
        mine = {start: e.to(device) for part in all_gather({s: e.cpu() for s, e in mine.items()}, ranks)
                for start, e in part.items()}
    return torch.cat([mine[s] for s in sorted(mine)]) if mine else torch.zeros(0, embedding_width(model), device=device)


# Class-folder data (``root/class_name/*.jpg``: ImageNet's validation layout); any
# modality's files work the same way (its ``extensions`` say which files are samples).

class _ClassFolderFiles(torch.utils.data.Dataset):
    """(path, folder label, transformed input or None) per file."""

    def __init__(self, files: list[tuple[str, str]], spec: ModalityData):
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, str, Any]:
        path, label = self.files[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            # decode() applies the modality's own limits (decompression bombs, draft-mode JPEG).
            value = self.spec.transform(self.spec.decode(data, Path(path).suffix[1:].lower()), False)
        except Exception:  # an unreadable file is a skipped sample, not a crashed eval
            value = None
        return path, label, value


def _collate_files(items: list[tuple[str, str, Any]], spec: ModalityData, modality: str) -> Batch:
    values = [v for _, _, v in items]
    return Batch(fields={modality: spec.collate(values)},
                 present={modality: torch.tensor([v is not None for v in values], dtype=torch.bool)},
                 keys=[p for p, _, _ in items], meta={"label": [label for _, label, _ in items]})


def class_folder_files(root: str, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, class folder name) of every file with one of ``extensions`` under ``root/<class>/``, sorted
    (torchvision's order)."""
    suffixes = {f".{e.lower()}" for e in extensions}
    files = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in suffixes and path.is_file():
                files.append((str(path), class_dir.name))
    if not files:
        raise DataError(f"{root!r} has neither shards (*.tar) nor class subfolders of {'/'.join(extensions)} files")
    return files


def class_folder_batches(spec: ModalityData, root: str, batch_size: int, workers: int = 1,
                         modality: str | None = None, files: list[tuple[str, str]] | None = None) -> Iterator[Batch]:
    """Batches of a class-folder dataset (or of ``files``, a part of its :func:`class_folder_files`):
    ``meta['label']`` is each file's class folder name."""
    dataset = _ClassFolderFiles(class_folder_files(root, spec.extensions) if files is None else files, spec)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=functools.partial(_collate_files, spec=spec, modality=modality or spec.modality),
        multiprocessing_context="fork" if workers > 0 else None)
    yield from loader


# Labels and accuracy, shared by classification tasks.

def sample_labels(emb: Embedded | TokenFeatures, label_key: str | None) -> list[str | None]:
    """Each sample's class name: its folder (class folders) or ``json[label_key]`` (shards)."""
    if "label" in emb.meta:
        return list(emb.meta["label"])
    if not label_key:
        raise ConfigError("label_key: required for shard data (the json field holding each sample's class)")
    out: list[str | None] = []
    for meta in emb.meta.get("json", [None] * len(emb)):
        value = meta.get(label_key) if isinstance(meta, dict) else None
        out.append(None if value is None else str(value))
    return out


def label_indices(labels: list[str | None], classes: list[str]) -> tuple[Tensor, list[str | None]]:
    """Class index per sample (-1 where the label is missing or not in ``classes``) and those labels."""
    index = {name: i for i, name in enumerate(classes)}
    ids = torch.tensor([index.get(label, -1) if label is not None else -1 for label in labels], dtype=torch.long)
    unknown = [label for label in labels if label is None or label not in index]
    return ids, unknown


def no_label_error(emb: Embedded | TokenFeatures, label_key: str | None, unknown: list[str | None], classes: list[str]) -> ConfigError:
    """A ConfigError explaining why no sample could be scored (wrong label_key or class list)."""
    from mmpt.registry import closest

    first = next((m for m in emb.meta.get("json", []) if isinstance(m, dict)), None)
    if first is not None and label_key not in first:
        return ConfigError(f"label_key: '{label_key}' is in no sample's json{closest(str(label_key), list(first))}; "
                           f"keys: {', '.join(first)}")
    seen = sorted({str(u) for u in unknown})[:5]
    return ConfigError(f"classnames: no sample's label is a class name (labels seen: {', '.join(seen) or 'none'}; "
                       f"classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")


def accuracy_metrics(top: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5, chance levels and per-class top-1 from ranked predictions ``top`` (N, k) and labels (N,).

    ``top5`` ranks min(5, classes) classes, so with fewer than five classes it is 1.0 and so is its chance.
    """
    num_classes = len(classes)
    chance = 1.0 / num_classes
    hits = top == labels.to(top.device).unsqueeze(1)
    top1 = hits[:, 0].double()  # float64 means: 0.105, not 0.10499999672
    k5 = min(5, num_classes, top.shape[1])
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    per_class = torch.bincount(labels.cpu(), weights=top1.cpu(), minlength=num_classes) / counts.clamp_min(1)
    seen = counts > 0
    out: dict[str, Any] = {
        "top1": top1.mean().item(),
        "top1_over_chance": top1.mean().item() / chance,
        "top5": hits[:, :k5].any(1).double().mean().item(),
        "chance": chance,
        "top5_chance": k5 / num_classes,
        "mean_per_class_top1": per_class[seen].mean().item(),
        "n": int(labels.numel()),
        "num_classes": num_classes,
    }
    out["per_class_top1"] = {classes[i]: per_class[i].item() for i in seen.nonzero().squeeze(1).tolist()}
    return out
