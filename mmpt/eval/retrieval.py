"""Retrieval (COCO / Flickr style): recall@K in both directions, between a modality and captions or
between any two modalities of the same samples, with several positives per query.

Against captions, a text is relevant to a sample when its normalised caption string equals any
caption of that sample, so identical captions of different samples all count as matches (a generated
dataset repeats captions often; scoring only the "own" sample would make correct answers look wrong).
Between two modalities, the positives of a query are the candidates of the same sample, or of every
sample sharing its ``match_key`` value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmpt.contracts import ModalityData
from mmpt.data.captions import normalise_caption
from mmpt.data.shards import DataError
from mmpt.eval.common import Embedded, Task, embed_data, embed_texts, embed_tokens, require_modality
from mmpt.model import MultimodalModel
from mmpt.registry import ConfigError, tasks


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


def pair_names(a: str, b: str, towers: Iterable[str]) -> tuple[str, str]:
    """Metric names of modalities ``a`` and ``b``: their initials where those tell the model's ``towers``
    apart (CLIP's ``i2t``), else their full names (point_cloud and protein both start with p)."""
    initials = [t[:1] for t in towers]
    if initials.count(a[:1]) == 1 and initials.count(b[:1]) == 1:
        return a[:1], b[:1]
    return a, b


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
                chunk: int = 1024, scores: Callable[[slice], Tensor] | None = None
                ) -> tuple[dict[int, float], float, int]:
    """Recall@k for each k, chance recall@1 and the number of answerable queries.

    ``relevance(rows)`` gives the (rows, n_candidates) bool matrix of a chunk of queries. Queries with
    no relevant candidate cannot be answered and are left out. Chance R@1 is the expected R@1 of a
    random ranking: the mean over queries of (#relevant / #candidates). ``scores(rows)``, when given,
    ranks a chunk of queries instead of their dot products with the candidates (re-ranking).
    """
    n_cand = len(candidates)
    depth = min(max(ks), n_cand)
    hits = dict.fromkeys(ks, 0)
    chance, answerable = 0.0, 0
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        rel = relevance(rows)
        top = (scores(rows) if scores is not None else queries[rows] @ candidates.T).topk(depth, dim=1).indices
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
    (the queries). text_modality: the tower embedding the captions; against captions the metrics are
    ``<m>2<t>_rK`` and ``<t>2<m>_rK`` with the two modalities' initials where those tell the model's
    towers apart (``i2t``/``t2i`` for image-text, ``a2t`` for audio), else their names. target: a second
    modality read from the same samples (e.g. ``audio`` against ``point_cloud``) instead of captions;
    metrics are then ``<modality>2<target>_rK`` and ``<target>2<modality>_rK``. match_key: with a
    target, a json field whose equal values make samples relevant to each other (several positives per
    query); default: only the same sample. rerank: name of the model's matching objective (e.g. ``itm``)
    that re-ranks each query's contrastive top ``rerank_k``; R@K after re-ranking are reported as
    ``..._rK_rerank`` beside the contrastive ones (run_tasks then passes the whole Pretrainer).
    rerank_k: how many contrastive candidates per query the matching head re-scores. rerank_similarity:
    weight of the contrastive cosine similarity added to the matching log-odds of each re-scored pair (0:
    the matching score alone, as ALBEF; BLIP adds the similarity with weight 1; a CLIP logit scale weighs
    the two as logits).
    """

    captions_key: str = "captions"
    ks: tuple[int, ...] = (1, 5, 10)
    modality: str = "image"
    text_modality: str = "text"
    target: str | None = None
    match_key: str | None = None
    rerank: str | None = None
    rerank_k: int = 16
    rerank_similarity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ks = tuple(self.ks)
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"ks: expected positive integers, got {list(self.ks)}")
        if self.target == self.modality:
            raise ConfigError(f"target: '{self.target}' is also the modality; retrieval needs two towers")
        if self.match_key is not None and self.target is None:
            raise ConfigError("match_key: only used with a target modality (captions match by their text)")
        if isinstance(self.rerank_k, bool) or not isinstance(self.rerank_k, int) or self.rerank_k < 1:
            raise ConfigError(f"rerank_k: expected a positive integer, got {self.rerank_k!r}")
        # re-ranking scores with an objective: run_tasks then passes the Pretrainer (towers + objectives)
        self.uses_objectives = self.rerank is not None

    def default_id(self) -> str:
        return "retrieval" if self.target is None else f"retrieval/{self.modality}-{self.target}"

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed the samples and every caption (or the target modality), then rank both ways."""
        objectives = getattr(model, "objectives", None)  # the Pretrainer's, when re-ranking
        model = getattr(model, "model", model)
        emb = self._embed(model, specs, device, progress, self.modality)
        if self.target is not None:
            target = self._embed(model, specs, device, progress, self.target)
            out = self._cross_modal(emb, target)
            if self.rerank is not None:
                vocab: dict[str, int] = {}
                target_ids = match_ids(target, self.match_key, -2, vocab)
                query_ids = match_ids(emb, self.match_key, -3, vocab).unsqueeze(1)
                out.update(self._reranked(model, objectives, specs, device, progress, emb, self.modality,
                                          target.embeddings,
                                          self._tokens(model, specs, device, progress, target, self.target),
                                          torch.arange(len(target)), self.target, target_ids, query_ids,
                                          (self.modality, self.target)))
            return out
        texts, text_ids, sample_ids = caption_ids(sample_captions(emb, self.captions_key))
        if not texts:
            raise DataError(f"retrieval: no captions in {self.data!r} (json['{self.captions_key}'] or txt)")
        # Identical strings are embedded once.
        unique: dict[str, int] = {}
        order = torch.tensor([unique.setdefault(t, len(unique)) for t in texts])
        text_emb = embed_texts(model, specs, list(unique), self.batch_size, device, modality=self.text_modality)
        text_emb = text_emb[order.to(text_emb.device)]
        names = pair_names(self.modality, self.text_modality, {*specs, self.modality, self.text_modality})
        out, n_queries = self._both_ways(emb.embeddings, text_emb, text_ids, sample_ids, *names)
        if self.rerank is not None:
            texts_tok = _text_tokens(model, specs, list(unique), self.batch_size, device, self.text_modality)
            out.update(self._reranked(model, objectives, specs, device, progress, emb, self.modality, text_emb,
                                      texts_tok, order, self.text_modality, text_ids, sample_ids, names))
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

    def _tokens(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
                progress: bool, emb: Embedded, modality: str) -> tuple[Tensor, Tensor]:
        """Padded tokens (N, T, D) and mask of the samples ``emb`` holds, in its order."""
        feats = embed_tokens(model, specs, self.data, self.batch_size, keep=(), device=device, progress=progress,
                             workers=self.workers, modality=modality, desc=f"{self.default_id()} {modality} tokens")
        if feats.keys != emb.keys:
            raise DataError(f"retrieval: the token pass over {self.data!r} read other samples than the embedding pass")
        return pad_tokens(feats.features)

    def _reranked(self, model: MultimodalModel, objectives: Any, specs: dict[str, ModalityData],
                  device: torch.device | str, progress: bool, a: Embedded, a_modality: str, b_emb: Tensor, b_tokens: tuple[Tensor, Tensor],
                  b_map: Tensor, b_modality: str, b_ids: Tensor, a_ids: Tensor, names: tuple[str, str]
                  ) -> dict[str, Any]:
        """R@K both ways after the matching objective re-ranks each query's contrastive top ``rerank_k``.
        ``b_map`` (n_b,) indexes each b row's tokens in ``b_tokens`` (identical captions are encoded once)."""
        matcher = self._matcher(objectives)
        a_tok, a_mask = self._tokens(model, specs, device, progress, a, a_modality)
        b_tok, b_mask = b_tokens
        a_tok, b_tok = matcher.project(model, a_modality, a_tok), matcher.project(model, b_modality, b_tok)
        b_map, b_ids, a_ids = b_map.to(a.embeddings.device), b_ids.to(a.embeddings.device), a_ids.to(a.embeddings.device)
        a_emb = a.embeddings

        a_side, b_side = (a_modality, a_tok, a_mask, None), (b_modality, b_tok, b_mask, b_map)
        fwd = recall_at_k(a_emb, b_emb, lambda r: relevance_matrix(b_ids, a_ids[r]).T, self.ks, scores=lambda r: rerank_top_k(
            a_emb[r] @ b_emb.T, self.rerank_k, lambda qi, ci: pair_scores(matcher, a_side, qi + r.start, b_side, ci),
            self.rerank_similarity))[0]
        back = recall_at_k(b_emb, a_emb, lambda r: relevance_matrix(b_ids[r], a_ids), self.ks, scores=lambda r: rerank_top_k(
            b_emb[r] @ a_emb.T, self.rerank_k, lambda qi, ci: pair_scores(matcher, b_side, qi + r.start, a_side, ci),
            self.rerank_similarity))[0]
        out = {f"{names[0]}2{names[1]}_r{k}_rerank": v for k, v in fwd.items()}
        out.update({f"{names[1]}2{names[0]}_r{k}_rerank": v for k, v in back.items()})
        out["mean_recall_rerank"] = sum(out.values()) / len(out)
        return out

    def _matcher(self, objectives: Any) -> Any:
        if objectives is None:
            raise ConfigError(f"rerank: {self.rerank!r} is an objective of the model, but only its towers were "
                              "passed to this task (run_tasks passes the Pretrainer)")
        if self.rerank not in objectives or not hasattr(objectives[self.rerank], "match_logit"):
            names = [n for n, o in objectives.items() if hasattr(o, "match_logit")]  # and project()
            raise ConfigError(f"rerank: {self.rerank!r} is not a matching objective of this model "
                              f"(matching objectives: {', '.join(names) or 'none'})")
        return objectives[self.rerank]


def pad_tokens(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-sample (T_i, D) token features into (N, max T, D) with a (N, max T) bool mask."""
    longest = max((f.shape[0] for f in features), default=1)
    tokens = features[0].new_zeros(len(features), longest, features[0].shape[1]) if features else torch.zeros(0, 1, 1)
    mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    for i, f in enumerate(features):
        tokens[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = True
    return tokens, mask


@torch.no_grad()
def _text_tokens(model: MultimodalModel, specs: dict[str, ModalityData], texts: list[str], batch_size: int,
                 device: torch.device | str, modality: str) -> tuple[Tensor, Tensor]:
    """Padded tokens and mask of strings through the ``modality`` tower."""
    spec = require_modality(specs, modality, "re-ranking texts")
    feats: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        fields = spec.prepare(texts[start:start + batch_size], train=False)
        out = model.encoders[modality]({k: v.to(device) for k, v in fields.items()})
        mask = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
        feats += [t[m] for t, m in zip(out.tokens.float(), mask.to(torch.bool), strict=True)]
    return pad_tokens(feats)


Side = tuple[str, Tensor, Tensor, "Tensor | None"]  # modality, padded tokens, mask, row index map (or None)


@torch.no_grad()
def pair_scores(matcher: Any, a: Side, a_rows: Tensor, b: Side, b_rows: Tensor, chunk: int = 512) -> Tensor:
    """``matcher.match_logit`` of the pairs (a row ``a_rows[i]``, b row ``b_rows[i]``), ``chunk`` pairs at a
    time so only a chunk's tokens are ever gathered."""
    def take(side: Side, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows if side[3] is None else side[3][rows]
        return side[1][rows], side[2][rows]

    scores = [matcher.match_logit({a[0]: take(a, a_rows[i:i + chunk]), b[0]: take(b, b_rows[i:i + chunk])})
              for i in range(0, len(a_rows), chunk)]
    return torch.cat(scores) if scores else torch.zeros(0)


def rerank_top_k(sims: Tensor, k: int, pair_score: Callable[[Tensor, Tensor], Tensor],
                 similarity: float = 0.0) -> Tensor:
    """Scores (R, C) ranking each row's contrastive top ``k`` by ``pair_score(row index, column index)``
    (flat index tensors -> one score each) plus ``similarity`` x their contrastive similarity, above every
    other column, which keeps its contrastive order."""
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices
    rows = torch.arange(sims.shape[0], device=sims.device)[:, None].expand(-1, k)
    rescored = pair_score(rows.reshape(-1), top.reshape(-1)).view(rows.shape).float().to(sims.device)
    rescored = rescored + similarity * sims.float().gather(1, top)
    out = sims.float().clone()
    # lift the re-scored block above the largest similarity, keeping its own order
    out[rows, top] = rescored - rescored.min() + out.max() + 1 if rescored.numel() else out[rows, top]
    return out
