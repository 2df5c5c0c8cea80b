"""Retrieval (COCO / Flickr style): recall@K in both directions, between a modality and captions or
between any two modalities of the same samples, with several positives per query.

Against captions, a text is relevant to a sample when its normalised caption string equals any
caption of that sample, so identical captions of different samples all count as matches (a generated
dataset repeats captions often; scoring only the "own" sample would make correct answers look wrong).
Between two modalities, the positives of a query are the candidates of the same sample, or of every
sample sharing its ``match_key`` value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmpt.data.shards import DataError
from mmpt.encoders.base import ModalityData
from mmpt.eval.common import Embedded, Task, embed_data, embed_texts
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, tasks


def normalise_caption(text: str) -> str:
    """Caption identity for relevance: lowercase, stripped, inner whitespace collapsed."""
    return " ".join(text.lower().split())


def sample_captions(emb: Embedded, captions_key: str) -> list[list[str]]:
    """Captions of each sample: ``json[captions_key]`` when present, else the lines of its ``txt``."""
    out = []
    for meta, txt in zip(emb.meta.get("json", [None] * len(emb)), emb.meta.get("txt", [None] * len(emb))):
        caps = meta.get(captions_key) if isinstance(meta, dict) else None
        if isinstance(caps, str):
            caps = [caps]
        if not caps:
            caps = txt.splitlines() if isinstance(txt, str) else []
        out.append([c.strip() for c in caps if isinstance(c, str) and c.strip()])
    return out


def caption_ids(captions: list[list[str]]) -> tuple[list[str], Tensor, Tensor]:
    """Texts (one per caption occurrence), their caption ids (n_text,) and each sample's ids (n_sample, m),
    padded with -1. Equal ids mean equal normalised strings."""
    ids: dict[str, int] = {}
    texts: list[str] = []
    text_ids: list[int] = []
    width = max((len(c) for c in captions), default=0)
    sample_ids = torch.full((len(captions), max(width, 1)), -1, dtype=torch.long)
    for i, caps in enumerate(captions):
        for j, cap in enumerate(caps):
            cid = ids.setdefault(normalise_caption(cap), len(ids))
            texts.append(cap)
            text_ids.append(cid)
            sample_ids[i, j] = cid
    return texts, torch.tensor(text_ids, dtype=torch.long), sample_ids


def relevance_matrix(query_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """(n_query, n_candidate) bool: query q is relevant to candidate c when its id is one of c's ids
    (``candidate_ids`` (n_candidate, m), padded with -1, which no query id equals)."""
    rel = torch.zeros(len(query_ids), len(candidate_ids), dtype=torch.bool, device=query_ids.device)
    for j in range(candidate_ids.shape[1]):  # one pass per id slot: memory stays (n_query, n_candidate)
        rel |= query_ids.unsqueeze(1) == candidate_ids[:, j].unsqueeze(0)
    return rel


def match_ids(emb: Embedded, match_key: str | None, missing: int, vocab: dict[str, int]) -> Tensor:
    """One id per sample: its key (same sample), or ``json[match_key]`` (every sample sharing the value);
    ``vocab`` (shared by both sides) numbers the values; samples lacking one get ``missing`` (chosen per
    side so that two missing values never match)."""
    if match_key is None:
        values: list[Any] = list(emb.keys)
    else:
        values = [m.get(match_key) if isinstance(m, dict) else None for m in emb.meta.get("json", [None] * len(emb))]
    return torch.tensor([missing if v is None else vocab.setdefault(str(v), len(vocab)) for v in values],
                        dtype=torch.long)


def recall_at_k(queries: Tensor, candidates: Tensor, relevance: Callable[[slice], Tensor], ks: tuple[int, ...],
                chunk: int = 1024) -> tuple[dict[int, float], float, int]:
    """Recall@k for each k, chance recall@1 and the number of answerable queries.

    ``relevance(rows)`` gives the (rows, n_candidates) bool matrix of a chunk of queries. Queries with
    no relevant candidate cannot be answered and are left out. Chance R@1 is the expected R@1 of a
    random ranking: the mean over queries of (#relevant / #candidates).
    """
    n_cand = len(candidates)
    depth = min(max(ks), n_cand)
    hits = dict.fromkeys(ks, 0)
    chance, answerable = 0.0, 0
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        rel = relevance(rows)
        top = (queries[rows] @ candidates.T).topk(depth, dim=1).indices
        found = rel.gather(1, top).cumsum(1) > 0  # found[:, j]: a relevant candidate within the top j+1
        ok = rel.any(1)
        for k in ks:
            hits[k] += int(found[ok, min(k, n_cand) - 1].sum())
        chance += float((rel[ok].sum(1).double() / n_cand).sum())
        answerable += int(ok.sum())
    if not answerable:
        return {k: float("nan") for k in ks}, float("nan"), 0
    return {k: hits[k] / answerable for k in ks}, chance / answerable, answerable


@tasks.register("retrieval")
@dataclass(kw_only=True)
class Retrieval(Task):
    """Recall@K both ways: samples of ``modality`` against their captions, or against ``target``.

    captions_key: json field listing each sample's captions (else the sample's ``txt`` lines); used
    when no ``target`` is set. ks: the K of recall@K. modality: the tower embedding the samples
    (the queries of ``i2t``). text_modality: the tower embedding the captions. target: a second
    modality read from the same samples (e.g. ``audio`` against ``point_cloud``) instead of captions;
    metrics are then ``<modality>2<target>_rK`` and ``<target>2<modality>_rK``. match_key: with a
    target, a json field whose equal values make samples relevant to each other (several positives per
    query); default: only the same sample.
    """

    captions_key: str = "captions"
    ks: tuple[int, ...] = (1, 5, 10)
    modality: str = "image"
    text_modality: str = "text"
    target: str | None = None
    match_key: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ks = tuple(self.ks)
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"ks: expected positive integers, got {list(self.ks)}")
        if self.target == self.modality:
            raise ConfigError(f"target: '{self.target}' is also the modality; retrieval needs two towers")
        if self.match_key is not None and self.target is None:
            raise ConfigError("match_key: only used with a target modality (captions match by their text)")

    def default_id(self) -> str:
        return "retrieval" if self.target is None else f"retrieval/{self.modality}-{self.target}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed the samples and every caption (or the target modality), then rank both ways."""
        emb = self._embed(model, specs, device, progress, self.modality)
        if self.target is not None:
            return self._cross_modal(emb, self._embed(model, specs, device, progress, self.target))
        texts, text_ids, sample_ids = caption_ids(sample_captions(emb, self.captions_key))
        if not texts:
            raise DataError(f"retrieval: no captions in {self.data!r} (json['{self.captions_key}'] or txt)")
        # Identical strings are embedded once.
        unique: dict[str, int] = {}
        order = torch.tensor([unique.setdefault(t, len(unique)) for t in texts])
        text_emb = embed_texts(model, specs, list(unique), self.batch_size, device, modality=self.text_modality)
        text_emb = text_emb[order.to(text_emb.device)]
        out, n_queries = self._both_ways(emb.embeddings, text_emb, text_ids, sample_ids, "i", "t")
        out.update(n_images=len(emb), n_texts=len(texts), n_images_without_captions=len(emb) - n_queries,
                   skipped=emb.skipped)
        return out

    def _embed(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
               progress: bool, modality: str) -> Embedded:
        return embed_data(model, specs, self.data, self.batch_size, keep=("json", "txt"), device=device,
                          progress=progress, workers=self.workers, modality=modality,
                          desc=f"{self.default_id()} {modality}")

    def _cross_modal(self, query: Embedded, target: Embedded) -> dict[str, Any]:
        if not len(query) or not len(target):
            empty = self.modality if not len(query) else self.target
            raise DataError(f"retrieval: no sample of {self.data!r} has a decodable '{empty}' member")
        vocab: dict[str, int] = {}
        target_ids = match_ids(target, self.match_key, -2, vocab)
        out, n_queries = self._both_ways(query.embeddings, target.embeddings, target_ids,
                                         match_ids(query, self.match_key, -3, vocab).unsqueeze(1),
                                         self.modality, self.target)
        out.update({f"n_{self.modality}": len(query), f"n_{self.target}": len(target),
                    f"n_{self.modality}_without_positive": len(query) - n_queries,
                    "skipped": query.skipped + target.skipped})
        return out

    def _both_ways(self, a: Tensor, b: Tensor, b_ids: Tensor, a_ids: Tensor, a_name: str,
                   b_name: str) -> tuple[dict[str, Any], int]:
        """Recall of a->b and b->a; ``b_ids`` (n_b,) one id per b row, ``a_ids`` (n_a, m) the ids of each a row."""
        b_ids, a_ids = b_ids.to(a.device), a_ids.to(a.device)
        ab, ab_chance, n_queries = recall_at_k(a, b, lambda r: relevance_matrix(b_ids, a_ids[r]).T, self.ks)
        ba, ba_chance, _ = recall_at_k(b, a, lambda r: relevance_matrix(b_ids[r], a_ids), self.ks)
        fwd, back = f"{a_name}2{b_name}", f"{b_name}2{a_name}"
        out: dict[str, Any] = {f"{fwd}_r{k}": v for k, v in ab.items()}
        out.update({f"{back}_r{k}": v for k, v in ba.items()})
        out["mean_recall"] = sum(out.values()) / len(out)
        out.update({f"{fwd}_r1_chance": ab_chance, f"{back}_r1_chance": ba_chance})
        if 1 in self.ks:
            out.update({f"{fwd}_r1_over_chance": ab[1] / ab_chance, f"{back}_r1_over_chance": ba[1] / ba_chance})
        return out, n_queries
