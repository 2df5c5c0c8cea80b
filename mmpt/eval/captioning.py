"""Caption eval: generate a caption per sample with the model's captioning objective (``caption``, ``coca``)
and score it against the sample's json: how often the caption names the true value of each attribute
(shape, colour, size, position on the demo data) against chance, plus corpus BLEU-4 and CIDEr against
the reference captions (pycocoevalcap's scorers, with a lowercase word tokenisation instead of its
PTB tokenizer, which needs Java).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from mmpt.data.loader import eval_loader
from mmpt.eval.common import Task, is_class_folder
from mmpt.nn.generate import GenerationConfig, Hypothesis, generate
from mmpt.registry import ConfigError, tasks

log = logging.getLogger(__name__)
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words (the tokenisation BLEU, CIDEr and attribute matching share)."""
    return _WORD.findall(text.lower())


def named_value(caption: list[str], values: list[tuple[str, ...]], ignore_followed_by: set[str]) -> int | None:
    """Index in ``values`` (each a tuple of words) of the first value the caption's words name, skipping an
    occurrence followed by one of ``ignore_followed_by`` ('a red background' names no shape colour)."""
    for start in range(len(caption)):
        for i, value in enumerate(values):
            end = start + len(value)
            if tuple(caption[start:end]) == value and (end >= len(caption) or caption[end] not in ignore_followed_by):
                return i
    return None


def attribute_scores(captions: list[str], labels: list[dict[str, Any]], attributes: list[str],
                     ignore_followed_by: list[str]) -> dict[str, float]:
    """Per attribute: ``<a>_acc`` (captions naming the true value), ``<a>_named`` (naming any value),
    ``<a>_acc_chance`` (one over the values seen under that json key) and ``<a>_acc_over_chance``."""
    out: dict[str, float] = {}
    tokenized = [words(c) for c in captions]
    stop = set(ignore_followed_by)
    for attr in attributes:
        truth = [None if lab is None or lab.get(attr) is None else str(lab[attr]).lower() for lab in labels]
        vocab = sorted({t for t in truth if t is not None})
        if not vocab:
            raise ConfigError(f"attributes: no sample's json has key '{attr}'")
        values = [tuple(words(v)) for v in vocab]
        named = [named_value(c, values, stop) for c in tokenized]
        scored = [(n, t) for n, t in zip(named, truth, strict=True) if t is not None]
        acc = sum(n is not None and vocab[n] == t for n, t in scored) / len(scored)
        chance = 1.0 / len(vocab)
        out.update({f"{attr}_acc": acc, f"{attr}_named": sum(n is not None for n, _ in scored) / len(scored),
                    f"{attr}_acc_chance": chance, f"{attr}_acc_over_chance": acc / chance})
    return out


def reference_scores(captions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of ``captions`` against each sample's references (samples without any skipped)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts, res = {}, {}
    for i, (cap, refs) in enumerate(zip(captions, references, strict=True)):
        refs = [" ".join(words(r)) for r in refs if words(r)]
        if refs:
            gts[i], res[i] = refs, [" ".join(words(cap))]
    if not gts:
        return {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "references_per_sample": sum(map(len, gts.values())) / len(gts)}


def sample_references(meta: dict[str, list[Any]], i: int, key: str) -> list[str]:
    """The references of sample ``i``: its json's ``key`` list (or string) and the lines of its txt."""
    refs: list[str] = []
    js = meta.get("json", [None])[i]
    if isinstance(js, dict) and js.get(key) is not None:
        value = js[key]
        refs += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    txt = meta.get("txt", [None])[i]
    if isinstance(txt, str):
        refs += [line.strip() for line in txt.splitlines() if line.strip()]
    return list(dict.fromkeys(refs))


@tasks.register("caption")
@dataclass(kw_only=True)
class CaptionEval(Task):
    """Caption each sample with the model's captioning objective and score the captions: per json attribute,
    how often a caption names the sample's value (vs chance: one over the values seen), plus BLEU-4 and
    CIDEr against the reference captions.

    modality: what to caption (the objective's source). objective: captioning objective to use (default:
    the one captioning ``modality``). attributes: json keys scored; a caption names the first value of that
    key (as seen in the data) it contains. ignore_followed_by: words that make an occurrence not count (on
    the demo data 'a red background' names the background, not the shape's colour). references_key: json
    key of the reference captions (the txt lines join them). strategy: 'greedy', 'beam' or 'sample'. beam:
    beams (strategy beam). max_len: tokens generated at most (default: what the decoder's positions allow).
    limit: caption only the first N samples (0: all). examples: captions kept in the results as examples.
    """

    modality: str = "image"
    objective: str | None = None
    attributes: list[str] = field(default_factory=lambda: ["shape", "color", "size", "position"])
    ignore_followed_by: list[str] = field(default_factory=lambda: ["background"])
    references_key: str = "captions"
    strategy: str = "greedy"
    beam: int = 4
    max_len: int | None = None
    limit: int = 0
    examples: int = 3
    # run_tasks passes the Pretrainer (model + objectives) instead of its towers
    uses_objectives: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit < 0 or self.examples < 0:
            raise ConfigError(f"limit/examples: must be >= 0, got {self.limit}/{self.examples}")
        if not self.attributes:
            raise ConfigError("attributes: name at least one json key to score")
        if is_class_folder(self.data):
            raise ConfigError(f"data: {self.data} is a folder of files; captions are scored against shards' json")

    def default_id(self) -> str:
        return f"caption/{self.modality}"

    def run(self, model: nn.Module, specs: dict[str, Any], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Captions and their scores (``model``: the Pretrainer)."""
        captioner = find_captioner(model.objectives, self.modality, self.objective)
        max_len = self.max_len or captioner.max_positions(model.model) - 1
        cfg = GenerationConfig(strategy=self.strategy, beam=self.beam, max_len=max_len, seed=0)
        tokenizer = specs[captioner.text].tokenizer
        captions: list[str] = []
        labels: list[Any] = []
        references: list[list[str]] = []
        for part in caption_batches(model.model, captioner, specs, self.data, self.batch_size, cfg, device=device,
                                    workers=self.workers, progress=progress):
            captions += [tokenizer.decode(h[0].tokens) for h in part.hypotheses]
            labels += part.meta["json"]
            references += [sample_references(part.meta, i, self.references_key) for i in range(len(part.keys))]
            if self.limit and len(captions) >= self.limit:
                break
        if self.limit:
            captions, labels, references = captions[:self.limit], labels[:self.limit], references[:self.limit]
        if not captions:
            raise ConfigError(f"data: no sample with a {self.modality!r} to caption in {self.data}")
        results: dict[str, Any] = {"samples": len(captions)}
        results.update(attribute_scores(captions, labels, self.attributes, self.ignore_followed_by))
        refs = reference_scores(captions, references)
        if not refs:
            log.warning("caption eval: no reference captions (json '%s' or txt) in %s: BLEU-4/CIDEr not computed",
                        self.references_key, self.data)
        results.update(refs)
        results["examples"] = [{"caption": c, "reference": r[0] if r else None}
                               for c, r in zip(captions[:self.examples], references[:self.examples], strict=True)]
        return results


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
