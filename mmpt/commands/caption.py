"""``mmpt caption``: generate captions for the samples of shards with a model's captioning objective and
write one JSON line per sample.

The model is an export or a run directory (:func:`mmpt.load`); any objective with ``start_decoding``
(``caption``, ``coca``) whose source is the asked modality captions it. :func:`caption_batches` is the
loop the ``caption`` eval task shares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmpt.data.loader import eval_loader
from mmpt.data.shards import DataError
from mmpt.nn.generate import GenerationConfig, Hypothesis, generate
from mmpt.registry import ConfigError


def find_captioner(objectives: nn.ModuleDict, modality: str, name: str | None = None) -> nn.Module:
    """The objective that captions ``modality`` (the one named ``name`` when given)."""
    able = {k: o for k, o in objectives.items() if hasattr(o, "start_decoding")}
    if name is not None:
        if name not in objectives:
            raise ConfigError(f"--objective {name}: no such objective; the model has {', '.join(objectives) or 'none'}")
        if name not in able:
            raise ConfigError(f"--objective {name}: objective '{name}' does not generate text")
        able = {name: able[name]}
    if not able:
        raise ConfigError(f"the model has no captioning objective (caption, coca); its objectives: "
                          f"{', '.join(objectives) or 'none'}")
    sources = {k: o for k, o in able.items() if o.source == modality}
    if not sources:
        found = ", ".join(f"{k} ({o.source})" for k, o in able.items())
        raise ConfigError(f"--modality {modality}: no captioning objective reads it; captioning objectives: {found}")
    if len(sources) > 1:
        raise ConfigError(f"--modality {modality}: several objectives caption it ({', '.join(sources)}); "
                          "choose one with --objective")
    return next(iter(sources.values()))


@dataclass
class Captioned:
    """One batch's captions: present samples only, in loader order."""

    keys: list[str]
    hypotheses: list[list[Hypothesis]]
    meta: dict[str, list[Any]]
    absent: int  # rows of the batch lacking the source modality


@torch.no_grad()
def caption_batches(model: nn.Module, objective: nn.Module, specs: dict[str, Any], pattern: str, batch_size: int,
                    cfg: GenerationConfig, *, device: torch.device | str = "cpu", workers: int = 1,
                    keep: tuple[str, ...] = ("json", "txt"), progress: bool = True,
                    dropped: list[int] | None = None) -> Iterator[Captioned]:
    """Captions of every sample of ``pattern`` that has the objective's source modality; ``model`` is the
    :class:`~mmpt.model.MultimodalModel`. ``dropped[0]`` receives the samples the loader left out whole."""
    modality = objective.source
    if modality not in specs:
        raise ConfigError(f"captioning {modality!r}: the model has no {modality!r} tower")
    loader = eval_loader(pattern, {modality: specs[modality]}, batch_size, keep=keep, workers=workers)
    bar = tqdm(disable=not progress, desc="caption", unit="sample", leave=False)
    try:
        for batch in loader:
            rows = batch.present[modality].nonzero().squeeze(1)
            if len(rows):
                fields = {k: v[rows].to(device) for k, v in batch.fields[modality].items()}
                hyps = generate(objective.start_decoding(model, fields), cfg)
                idx = rows.tolist()
                meta = {ext: [batch.meta.get(ext, [None] * len(batch))[i] for i in idx] for ext in keep}
                yield Captioned([batch.keys[i] for i in idx], hyps, meta, len(batch) - len(idx))
            bar.update(len(batch))
    finally:
        bar.close()
    if dropped is not None:
        dropped[0] = sum(loader.state.total_skips().values())


def caption(model_path: str, data: str, modality: str, out: str, *, objective: str | None = None,
            batch_size: int = 64, workers: int = 1, progress: bool = True, allow_nonfinite: bool = False,
            **generation: Any) -> str:
    """Caption every sample of ``data`` into JSONL ``out`` (key, caption, score, finished; ``captions`` with
    the n-best list when n_best > 1); returns the summary line. ``generation``: :class:`GenerationConfig` keys
    (``max_len`` defaults to what the decoder's positions allow)."""
    from mmpt import load

    model, specs, _ = load(model_path, allow_nonfinite=allow_nonfinite)
    captioner = find_captioner(model.objectives, modality, objective)
    if generation.get("max_len") is None:
        generation["max_len"] = captioner.max_positions(model.model) - 1
    cfg = GenerationConfig(**generation)
    tokenizer = specs[captioner.text].tokenizer
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    written, absent, dropped = 0, 0, [0]
    with open(tmp, "w", encoding="utf-8") as f:
        for part in caption_batches(model.model, captioner, specs, data, batch_size, cfg, workers=workers,
                                    keep=(), progress=progress, dropped=dropped):
            for key, hyps in zip(part.keys, part.hypotheses, strict=True):
                f.write(json.dumps(caption_record(key, hyps, tokenizer, cfg.n_best)) + "\n")
            written += len(part.keys)
            absent += part.absent
    if not written:
        tmp.unlink()
        raise DataError(f"{data}: no sample with a decodable {modality!r} to caption "
                        f"({absent} lacked it, {dropped[0]} skipped by the loader)")
    os.replace(tmp, path)
    skipped = f"; skipped {absent + dropped[0]} without a usable {modality}" if absent + dropped[0] else ""
    return f"captioned {written} samples ({cfg.strategy}, max_len {cfg.max_len}) -> {path}{skipped}"


def caption_record(key: str, hyps: list[Hypothesis], tokenizer: Any, n_best: int) -> dict[str, Any]:
    """One JSONL record: the best caption, its score and whether it ended with EOS, plus the n-best list."""
    best = hyps[0]
    record: dict[str, Any] = {"key": key, "caption": tokenizer.decode(best.tokens), "score": round(best.score, 5),
                              "finished": best.finished}
    if n_best > 1:
        record["captions"] = [{"caption": tokenizer.decode(h.tokens), "score": round(h.score, 5)} for h in hyps]
    return record
