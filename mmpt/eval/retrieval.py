"""Image-text retrieval (COCO / Flickr style): recall@K in both directions with several captions per image.

A text is relevant to an image when its normalised caption string equals any caption of that image,
so identical captions of different images all count as matches (a generated dataset repeats captions
often; scoring only the "own" image would make correct answers look wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmpt.data.shards import DataError
from mmpt.encoders.base import ModalityData
from mmpt.eval.common import Embedded, Task, embed_images, embed_texts
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
    """Texts (one per caption occurrence), their caption ids (n_text,) and each image's ids (n_image, m),
    padded with -1. Equal ids mean equal normalised strings."""
    ids: dict[str, int] = {}
    texts: list[str] = []
    text_ids: list[int] = []
    width = max((len(c) for c in captions), default=0)
    image_ids = torch.full((len(captions), max(width, 1)), -1, dtype=torch.long)
    for i, caps in enumerate(captions):
        for j, cap in enumerate(caps):
            cid = ids.setdefault(normalise_caption(cap), len(ids))
            texts.append(cap)
            text_ids.append(cid)
            image_ids[i, j] = cid
    return texts, torch.tensor(text_ids, dtype=torch.long), image_ids


def relevance_matrix(text_ids: Tensor, image_ids: Tensor) -> Tensor:
    """(n_text, n_image) bool: text t is relevant to image i when its id is one of the image's ids."""
    rel = torch.zeros(len(text_ids), len(image_ids), dtype=torch.bool, device=text_ids.device)
    for j in range(image_ids.shape[1]):  # one pass per caption slot: memory stays (n_text, n_image)
        rel |= text_ids.unsqueeze(1) == image_ids[:, j].unsqueeze(0)
    return rel


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
    """Image->text and text->image recall@K over shards whose samples carry one or more captions.

    captions_key: json field listing each sample's captions (else the sample's ``txt`` lines).
    ks: the K of recall@K. modality / text_modality: the two towers compared.
    """

    captions_key: str = "captions"
    ks: tuple[int, ...] = (1, 5, 10)
    modality: str = "image"
    text_modality: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ks = tuple(self.ks)
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"ks: expected positive integers, got {list(self.ks)}")

    def run(self, model: MultimodalModel, specs: dict[str, ModalityData], device: torch.device | str,
            progress: bool = True) -> dict[str, Any]:
        """Embed images and every caption, then rank both ways."""
        emb = embed_images(model, specs, self.data, self.batch_size, keep=("json", "txt"), device=device,
                           progress=progress, workers=self.workers, modality=self.modality, desc="retrieval")
        texts, text_ids, image_ids = caption_ids(sample_captions(emb, self.captions_key))
        if not texts:
            raise DataError(f"retrieval: no captions in {self.data!r} (json['{self.captions_key}'] or txt)")
        # Identical strings are embedded once.
        unique: dict[str, int] = {}
        order = torch.tensor([unique.setdefault(t, len(unique)) for t in texts])
        text_emb = embed_texts(model, specs, list(unique), self.batch_size, device, modality=self.text_modality)
        text_emb = text_emb[order.to(text_emb.device)]
        img_emb = emb.embeddings
        text_ids, image_ids = text_ids.to(img_emb.device), image_ids.to(img_emb.device)

        i2t, i2t_chance, n_queries = recall_at_k(img_emb, text_emb, lambda r: relevance_matrix(text_ids, image_ids[r]).T,
                                                 self.ks)
        t2i, t2i_chance, _ = recall_at_k(text_emb, img_emb, lambda r: relevance_matrix(text_ids[r], image_ids), self.ks)
        out: dict[str, Any] = {f"i2t_r{k}": v for k, v in i2t.items()}
        out.update({f"t2i_r{k}": v for k, v in t2i.items()})
        out["mean_recall"] = sum(out.values()) / len(out)
        out.update(i2t_r1_chance=i2t_chance, t2i_r1_chance=t2i_chance)
        if 1 in self.ks:
            out.update(i2t_r1_over_chance=i2t[1] / i2t_chance, t2i_r1_over_chance=t2i[1] / t2i_chance)
        out.update(n_images=len(emb), n_texts=len(texts), n_images_without_captions=len(emb) - n_queries,
                   skipped=emb.skipped)
        return out
